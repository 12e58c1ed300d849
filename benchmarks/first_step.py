"""A Lightning callback for benchmarks/speed.py: at the first training step, writes the wall-clock
time and the third-party packages the process has loaded by then (the start-up reference imports
exactly those)."""

import json
import sys
import time
from pathlib import Path

import lightning as L

NOT_THIRD_PARTY = {"xray_cls", "first_step", "__main__", "__mp_main__"}


def loaded_packages() -> list[str]:
    """Top-level packages in sys.modules that are neither the standard library nor this project;
    private and compiled helper modules (`_yaml`, `<hash>__mypyc`) are left out: their packages load them."""
    names = {name.partition(".")[0] for name in list(sys.modules)} - NOT_THIRD_PARTY - sys.stdlib_module_names
    # importable by name: not private, not a compiled helper (`<hash>__mypyc`) or a built-in (`cython_runtime`)
    return sorted(n for n in names if n.isidentifier() and not n.startswith("_") and getattr(sys.modules.get(n), "__file__", None))


class FirstStepStamp(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == 0 and not self.path.exists():
            self.path.write_text(json.dumps({"time": time.time(), "packages": loaded_packages()}))
