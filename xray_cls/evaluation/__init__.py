"""Layer 7, evaluation: a trained model on other data. May import every layer below it.

- `options`: split, site.*, the adaptation methods (no torch import);
- `reading`: data read as a checkpoint's model was trained, and the choices it is evaluated with;
- `ensemble`: averaged probabilities of several checkpoints and of shifted views (TTA);
- `site`, `site_protocol`: adapting and recalibrating at another site, and evaluate's protocol for it.
"""
