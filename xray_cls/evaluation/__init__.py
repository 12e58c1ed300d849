"""Layer 8, evaluation: a trained model on other data.
May import: core, runtime, data, metrics, models, training, reports.

- `options`: split, site.*, the adaptation methods (no torch import);
- `reading`: data read as a checkpoint's model was trained, and the choices it is evaluated with;
- `logits`: a model's logits on a split, batch by batch (what val choices and recalibration are made on);
- `ensemble`: averaged probabilities of several checkpoints and of shifted views (TTA);
- `site`, `site_protocol`: adapting and recalibrating at another site, and evaluate's protocol for it;
- `site_choice`: which of as-is, adapted, recalibrated and both the protocol applies, chosen on the calibration part.
"""
