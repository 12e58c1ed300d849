"""The names of the flat layout (before the layer folders), and where they went: so that an import
a user wrote, a config's `_target_` or a checkpoint's network name still works.

- `import xray_cls.checkpoint` (a module that moved) gives a module that forwards every name to
  where it is now, with a DeprecationWarning naming the place (`MovedModules`, installed by
  `xray_cls/__init__.py`); `xray_cls.config`, split apart and its `check_options` now taking the
  options themselves, fails with one line saying where its names went.
- `from xray_cls.train import build_trainer` (a name that left a module that stayed) works the same
  way, through that module's `__getattr__ = forwarding(__name__)`.
- `canonical(target)` names a `_target_` of the old layout as today's, so that a run written
  before resumes and is compared with its config as it was.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

# old module -> the modules its names are in now (the first holds most)
MOVED = {
    "errors": ["core.errors"], "files": ["core.files"], "memory": ["core.memory"], "untrusted": ["core.untrusted"],
    "task": ["core.task"], "resolvers": ["runtime.configs"], "cli": ["runtime.console"], "run_folder": ["runtime.run_folder"],
    "interrupts": ["runtime.interrupts"], "slurm": ["runtime.slurm"], "slurm_watcher": ["runtime.slurm_watcher"],
    "val_choices": ["metrics.val_choices", "evaluation.logits"], "heads": ["models.heads"], "networks": ["models.networks"],
    "backbones": ["models.backbones"], "classifier": ["models.classifier"], "pretrained": ["models.pretrained", "training.fine_tuning"],
    "checkpoint": ["models.checkpoints", "models.untrusted_files", "core.checkpoint_files", "training.trainer"], "callbacks": ["training.callbacks"],
    "loggers": ["training.loggers", "core.untrusted"], "resume": ["training.resume", "training.training_state"],
    "gradcam": ["reports.gradcam"], "course_report": ["reports.course_report"], "cross_validation": ["reports.cross_validation"],
    "ensemble": ["evaluation.ensemble"], "site": ["evaluation.site"], "site_protocol": ["evaluation.site_protocol"],
    "run_report": ["reports.test_report", "reports.figures", "reports.tables", "reports.network_summary", "training.loggers"],
    "config": ["core.options", "runtime.configs", "data.options", "metrics.options", "models.options", "training.options",
               "evaluation.options"],
}
# a module that stayed -> the modules the names that left it are in now
LEFT = {
    "train": ["training.losses", "training.trainer", "training.resume", "training.fine_tuning", "training.loggers"],
    "evaluate": ["evaluation.reading"], "predict": ["data.inputs"], "sweep_report": ["reports.sweep", "reports.sweep_runs",
                                                                                    "reports.sweep_figures"],
    "data.folder": ["data.patients"], "data.images": ["data.dicom", "data.headers"], "data.datamodule": ["data.splits"],
    "models.checkpoints": ["models.untrusted_files"],
    "metrics": ["metrics.calibration", "metrics.thresholds", "metrics.bootstrap", "metrics.per_class"],
}


def find(name: str, homes: list[str]) -> tuple[str, Any] | None:
    """(module, value) of `name` in the first of `homes` (xray_cls.<home>) that holds it."""
    for home in homes:
        module = importlib.import_module(f"xray_cls.{home}")
        if hasattr(module, name):
            return module.__name__, getattr(module, name)
    return None


def forwarding(old: str, homes: list[str] | None = None) -> Callable[[str], Any]:
    """A module `__getattr__` giving the names that moved out of module `old` from where they are now."""
    if old == "__main__":  # run as `python -m xray_cls.train`: its name is in its spec
        old = sys.modules["__main__"].__spec__.name  # type: ignore[union-attr]
    short = old.removeprefix("xray_cls.")
    places = homes if homes is not None else LEFT[short]

    def __getattr__(name: str) -> Any:
        found = find(name, places) if not name.startswith("__") else None
        if found is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} is now {found[0]}.{name}", DeprecationWarning, stacklevel=2)
        return found[1]

    return __getattr__


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `xray_cls.<old module>` and loads it as a module that forwards to the new places."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.partition(".")
        return importlib.machinery.ModuleSpec(fullname, self) if package == "xray_cls" and name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        name = spec.name.removeprefix("xray_cls.")
        if name == "config":  # split apart, its check_options now taking the options themselves: no module stands for it
            raise ImportError(f"{spec.name} was split in the layer folders: its names are in "
                              f"{', '.join('xray_cls.' + home for home in MOVED[name])} (CHANGELOG.md)")
        warnings.warn(f"{spec.name} is now xray_cls.{MOVED[name][0]}", DeprecationWarning, stacklevel=2)
        module = types.ModuleType(spec.name, f"moved to xray_cls.{MOVED[name][0]}")
        module.__getattr__ = forwarding(spec.name, MOVED[name])  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # the module forwards; nothing runs


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())


# Prefixes of dotted names (a config's `_target_`, a checkpoint's network) of the flat layout.
PREFIXES = {f"xray_cls.{old}.": f"xray_cls.{homes[0]}." for old, homes in MOVED.items() if old != "config"}


def canonical(target: object) -> object:
    """A dotted name of the flat layout (`xray_cls.networks.CNN`) as today's; anything else as it is."""
    if isinstance(target, str):
        for old, new in PREFIXES.items():
            if target.startswith(old) and target.count(".") == old.count("."):
                return new + target.removeprefix(old)
    return target
