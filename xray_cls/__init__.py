"""xray_cls: NORMAL vs PNEUMONIA chest X-ray classification with Lightning and Hydra.

The package's folders are its layers, each importing only those below it (docs/development.md):
core, runtime, data, metrics, models, training, reports, evaluation; the modules at this level
are the commands (train, evaluate, predict, export, adapt, recalibrate, sweep_report). Modules and
names of the earlier flat layout (`xray_cls.checkpoint`, ...) still import, with a
DeprecationWarning naming where they went (`core.legacy_names`).
"""

from xray_cls.core import legacy_names

__version__ = "0.1.0"

legacy_names.install()
