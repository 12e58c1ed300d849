"""`python -m xray_cls.sweep_report SWEEP_DIR`: the report of a sweep, written again from what its
runs wrote (also written at the end of every multirun). See xray_cls.reports.sweep."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from xray_cls.core.legacy_names import forwarding
from xray_cls.reports.sweep import write_report

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    from xray_cls.runtime.console import exit_on_user_error
    from xray_cls.runtime.interrupts import interruptible

    parser = argparse.ArgumentParser(prog="python -m xray_cls.sweep_report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. outputs/multirun/<date>/<time>")
    args = parser.parse_args(argv)

    def report() -> None:
        with interruptible(lambda: "the report was not finished (each of its files is whole, old or new); run the command again"):
            print(write_report(args.sweep_dir))

    exit_on_user_error(report)



__getattr__ = forwarding(__name__)  # the names that moved out of this module, from where they are now

if __name__ == "__main__":
    main()
