"""`python -m xray_cls [COMMAND] OVERRIDES...` and the `xray-cls` console script: train by default,
or the command named first (`xray-cls evaluate ckpt=...`), each the module of its own name."""

from __future__ import annotations

import importlib
import sys

# command -> its module (which `python -m xray_cls.<module>` runs as well)
COMMANDS = {
    "train": "xray_cls.train",
    "evaluate": "xray_cls.evaluate",
    "predict": "xray_cls.predict",
    "export": "xray_cls.export",
    "adapt": "xray_cls.adapt",
    "pretrain": "xray_cls.pretrain",
    "recalibrate": "xray_cls.recalibrate",
    "sweep-report": "xray_cls.sweep_report",
}


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else "train"
    if len(sys.argv) > 1 and sys.argv[1] == command:
        sys.argv = [f"{sys.argv[0]} {command}", *sys.argv[2:]]
    importlib.import_module(COMMANDS[command]).main()


if __name__ == "__main__":
    main()
