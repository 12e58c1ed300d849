"""Where the modules of the flat layout (before the layer folders) went, so that an import a user
wrote still works: `import xray_cls.checkpoint` gives `xray_cls.models.checkpoints`, with a
DeprecationWarning naming it. A module that was split (`xray_cls.config`, `xray_cls.run_report`,
...) fails with one line saying where its names went."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Any

MOVED = {
    "errors": "core.errors", "files": "core.files", "memory": "core.memory", "untrusted": "core.untrusted", "task": "core.task",
    "resolvers": "runtime.configs", "cli": "runtime.console", "run_folder": "runtime.run_folder",
    "interrupts": "runtime.interrupts", "slurm": "runtime.slurm", "slurm_watcher": "runtime.slurm_watcher",
    "val_choices": "metrics.val_choices", "heads": "models.heads", "networks": "models.networks", "backbones": "models.backbones",
    "classifier": "models.classifier", "pretrained": "models.pretrained", "checkpoint": "models.checkpoints",
    "callbacks": "training.callbacks", "loggers": "training.loggers", "resume": "training.resume",
    "gradcam": "reports.gradcam", "course_report": "reports.course_report", "cross_validation": "reports.cross_validation",
    "ensemble": "evaluation.ensemble", "site": "evaluation.site", "site_protocol": "evaluation.site_protocol",
}
SPLIT = {
    "config": "xray_cls.core.options (the checks), xray_cls.runtime.configs (CONFIG_DIR) and each layer's options.py",
    "metrics": "xray_cls.metrics.calibration, .thresholds, .bootstrap and .per_class",
    "run_report": "xray_cls.reports.test_report, .figures, .tables and .network_summary",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `xray_cls.<old name>` and loads it as the module it became."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.partition(".")
        if package != "xray_cls" or (name not in MOVED and name not in SPLIT):
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        name = spec.name.removeprefix("xray_cls.")
        if name in SPLIT:
            raise ImportError(f"{spec.name} was split in the layer folders: its names are in {SPLIT[name]} (CHANGELOG.md)")
        new = f"xray_cls.{MOVED[name]}"
        warnings.warn(f"{spec.name} is now {new}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: Any) -> None:
        pass  # the module it became is executed already


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
