"""xray_cls: NORMAL vs PNEUMONIA chest X-ray classification with Lightning and Hydra."""

__version__ = "0.1.0"
