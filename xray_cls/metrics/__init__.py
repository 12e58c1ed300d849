"""Layer 3, the metrics: scores and choices made on predictions (probabilities and labels), beyond
torchmetrics' own.
May import: core.

- `options`: threshold_rule, calibration and bootstrap.* (no torch import);
- `calibration`: probabilities at a temperature, ECE, reliability bins, temperature scaling;
- `thresholds`: the decision threshold by a rule, on val;
- `bootstrap`: confidence intervals of the test scores; `per_class`: each class's scores;
- `val_choices`: the temperature and threshold a run chooses on val, as one value, and how they are chosen.
"""

from xray_cls.core.legacy_names import forwarding

__getattr__ = forwarding(__name__)  # xray_cls.metrics was a module: its names, from where they are now
