"""Layer 3, the metrics: scores and choices made on predictions (probabilities and labels), beyond
torchmetrics' own. May import xray_cls.core and xray_cls.data.

- `options`: threshold_rule, calibration and bootstrap.* (no torch import);
- `calibration`: probabilities at a temperature, ECE, reliability bins, temperature scaling;
- `thresholds`: the decision threshold by a rule, on val;
- `bootstrap`: confidence intervals of the test scores; `per_class`: each class's scores;
- `val_choices`: the temperature and threshold a run chooses on val, as one value.
"""
