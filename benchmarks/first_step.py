"""A Lightning callback for benchmarks/speed.py: writes the wall-clock time of the first training step."""

import time
from pathlib import Path

import lightning as L


class FirstStepStamp(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == 0 and not self.path.exists():
            self.path.write_text(repr(time.time()))
