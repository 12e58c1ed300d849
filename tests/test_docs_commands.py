"""Every `python -m xray_cls...` and `xray-cls ...` command that README.md and docs/ show composes as written.

Each command's overrides are composed with Hydra into the config the command would run with (what
`--cfg job` prints), so an override the docs name and the configs do not know (a renamed option, a
removed group) fails here. A multirun's comma-separated values are composed one combination at a
time (the first); placeholders such as `<run>` are plain text to Hydra.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from xray_cls.runtime.configs import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = {"xray_cls": "train", "xray_cls.evaluate": "evaluate", "xray_cls.predict": "predict", "xray_cls.export": "export",
           "xray_cls.adapt": "adapt", "xray_cls.recalibrate": "recalibrate", "xray_cls.pretrain": "pretrain"}
OTHER_MODULES = {"xray_cls.sweep_report"}  # argparse commands: the module must exist


def shown_commands() -> list[tuple[str, str]]:
    """(page, command) for every `python -m xray_cls...` in a fenced shell block."""
    commands = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", page.read_text(), flags=re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"&&|;", line):
                    part = re.sub(r"\s+#.*$", "", part).strip()
                    if part.startswith("sudo "):
                        part = part[5:]
                    if part.startswith("python -m xray_cls"):
                        commands.append((page.name, part))
                    elif part.startswith("xray-cls"):  # the console script: the same commands
                        commands.append((page.name, as_module(part)))
    return commands


def as_module(command: str) -> str:
    """`xray-cls evaluate ckpt=...` as the `python -m xray_cls.evaluate ckpt=...` it runs."""
    from xray_cls.__main__ import COMMANDS as CONSOLE

    words = shlex.split(command)
    name = words[1] if len(words) > 1 and words[1] in CONSOLE else "train"
    module = "xray_cls" if name == "train" else CONSOLE[name]
    return shlex.join(["python", "-m", module, *words[1 + (len(words) > 1 and words[1] == name):]])


COMMANDS = shown_commands()


def test_the_docs_show_commands_of_every_kind() -> None:
    modules = {shlex.split(command)[2] for _, command in COMMANDS}
    assert set(CONFIGS) | OTHER_MODULES <= modules
    assert len(COMMANDS) > 40


def first_combination(overrides: list[str]) -> list[str]:
    """The overrides of a multirun's first job: `a=1,2` -> `a=1`."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            value = next(iter(override.sweep_string_iterator()))
            first.append(f"{override.get_key_element()}={value}")
        else:
            first.append(text)
    return first


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{page}: {command[:80]}" for page, command in COMMANDS])
def test_a_shown_command_composes(page: str, command: str) -> None:
    words = shlex.split(re.sub(r"\$\([^)]*\)", "a.ckpt,b.ckpt", command))  # a shell substitution, as the shell would fill it
    module, args = words[2], words[3:]
    if module in OTHER_MODULES:
        __import__(module)
        return
    assert module in CONFIGS, f"{page}: {command}: no such command"
    overrides = [a for a in args if not a.startswith("-") and a not in ("job", "hydra", "all")]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(CONFIGS[module], overrides=first_combination(overrides), return_hydra_config=True)
    for override in OverridesParser.create().parse_overrides(first_combination(overrides)):
        key = override.get_key_element().lstrip("+~")
        if "/" not in key and not (CONFIG_DIR / key).is_dir():  # a value, not a group option: it must be in the config
            assert cfg is not None and _has(cfg, key), f"{page}: {command}: {key} is not in the composed config"


def _has(cfg: object, key: str) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default="<absent>") != "<absent>" or key in ("ckpt", "input")
