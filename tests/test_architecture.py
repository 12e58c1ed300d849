"""The package's plan, as its imports draw it (scripts/layers.py): no import runs back up a layer,
none closes a circle, no module is over about 300 lines, and docs/development.md shows today's picture."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def layers():
    spec = importlib.util.spec_from_file_location("layers", ROOT / "scripts" / "layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_runs_back_up_or_closes_a_circle(layers) -> None:
    edges = layers.graph()
    assert len(edges) > 60 and sum(map(len, edges.values())) > 150  # the imports were read
    assert layers.back_up(edges) == []
    assert layers.circles(edges) == []


def test_the_checks_see_an_import_back_up_and_a_circle(layers) -> None:
    """The checks can fail: a core module importing a command, and two modules importing each other."""
    edges = {m: set(t) for m, t in layers.graph().items()}
    edges["xray_cls.core.errors"].add("xray_cls.train")
    assert layers.back_up(edges) == ["xray_cls.core.errors -> xray_cls.train"]
    assert ["xray_cls.core.errors", "xray_cls.train"] in [sorted(set(g) & {"xray_cls.core.errors", "xray_cls.train"}) for g in layers.circles(edges)]


def test_no_module_is_over_about_300_lines(layers) -> None:
    assert layers.too_long() == []


def test_the_docs_show_todays_picture(layers) -> None:
    docs = (ROOT / "docs" / "development.md").read_text()
    assert layers.with_picture(docs, layers.drawing(layers.graph())) == docs, "run: python scripts/layers.py --write docs/development.md"


def test_every_folder_says_what_it_may_import_as_the_checks_do(layers) -> None:
    import re

    folders = sorted(p for p in (ROOT / "xray_cls").iterdir() if (p / "__init__.py").is_file())
    assert [f.name for f in folders] == sorted(layer for layer in layers.LAYERS if layer != "commands")
    for folder in folders:
        doc = (folder / "__init__.py").read_text()
        said = re.search(r"May import: ([^.]*)\.", doc)
        assert doc.startswith('"""Layer ') and said, folder.name
        assert said.group(1).split(", ") == (layers.ALLOWED[folder.name] or ["nothing of xray_cls"]), folder.name


def test_every_import_is_one_its_folder_may_make(layers) -> None:
    assert layers.not_allowed(layers.graph()) == []
    edges = {m: set(t) for m, t in layers.graph().items()}
    edges["xray_cls.data.images"].add("xray_cls.runtime.console")  # data may import core only
    assert layers.not_allowed(edges) == ["xray_cls.data.images -> xray_cls.runtime.console"]


def test_an_import_of_the_flat_layout_still_works_or_says_where_it_went() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from xray_cls.checkpoint import load_classifier, write_checkpoint  # noqa: F401  the flat layout's names
        from xray_cls.train import build_trainer  # a name that left a module that stayed
    from xray_cls.core.checkpoint_files import write_checkpoint as written_now
    from xray_cls.models.checkpoints import load_classifier as today
    from xray_cls.training.trainer import build_trainer as built_now

    assert load_classifier is today and write_checkpoint is written_now and build_trainer is built_now
    said = [str(w.message) for w in caught]
    assert "xray_cls.checkpoint is now xray_cls.models.checkpoints" in said
    assert "xray_cls.checkpoint.write_checkpoint is now xray_cls.core.checkpoint_files.write_checkpoint" in said
    assert "xray_cls.train.build_trainer is now xray_cls.training.trainer.build_trainer" in said
    import xray_cls.models.checkpoints

    assert xray_cls.models.checkpoints.__spec__.name == "xray_cls.models.checkpoints"  # the module itself is untouched
    result = subprocess.run([sys.executable, "-c", "import xray_cls.config"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "ImportError: xray_cls.config was split in the layer folders: its names are in xray_cls.core.options" in result.stderr
    with pytest.raises(ImportError, match="cannot import name 'nothing_of_the_kind' from 'xray_cls.train'"):
        from xray_cls.train import nothing_of_the_kind  # noqa: F401  a name that never was: still an error


def test_a_run_written_before_the_folders_resumes_with_its_config_as_it_was(tmp_path: Path) -> None:
    """Its config.yaml names xray_cls.networks.CNN and xray_cls.callbacks.RunCheckpoint: no setting differs."""
    from omegaconf import OmegaConf

    from xray_cls.training.resume import config_changes

    from conftest import SHORT_RUN, compose_config

    cfg = compose_config(tmp_path, SHORT_RUN)
    old = OmegaConf.to_yaml(cfg, resolve=True).replace("xray_cls.models.networks.", "xray_cls.networks.")
    old = old.replace("xray_cls.training.callbacks.", "xray_cls.callbacks.")
    assert "xray_cls.networks.CNN" in old and "xray_cls.callbacks.RunCheckpoint" in old
    (tmp_path / "config.yaml").write_text(old)
    assert config_changes(tmp_path, cfg) == []
    (tmp_path / "config.yaml").write_text(old.replace("xray_cls.networks.CNN", "xray_cls.networks.MLP"))
    assert config_changes(tmp_path, cfg) == ["model._target_"]


def test_an_old_checkpoints_network_name_is_todays(tmp_path: Path) -> None:
    """Checkpoints written before the folders name xray_cls.networks.MLP: they load, and resume, as today's."""
    from xray_cls.models.networks import MLP, build_network, canonical_config

    net = build_network({"_target_": "xray_cls.networks.MLP", "in_channels": 1, "image_size": 4, "hidden": [], "dropout": 0})
    assert isinstance(net, MLP)
    assert canonical_config({"_target_": "xray_cls.backbones.TorchvisionNet"}) == {"_target_": "xray_cls.models.backbones.TorchvisionNet"}
