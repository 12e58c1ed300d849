"""What a network's last layer outputs for a task: one logit for two classes, one per class for more."""

from __future__ import annotations

from torch import Tensor

from xray_cls.core.options import check_number


def output_width(num_classes: int) -> int:
    """One logit for two classes (the positive class's), one per class for more."""
    check_number("num_classes", num_classes, 2, integer=True, expected="an integer >= 2")
    return 1 if num_classes == 2 else num_classes


def class_logits(outputs: Tensor) -> Tensor:
    """A network's outputs as the classifier takes them: (N, 1) -> (N,); (N, K) for K >= 3 as they are.
    A Keras-style softmax pair (N, 2) -> z1 - z0, whose sigmoid is the softmax's probability of
    class 1 and whose binary cross-entropy is the pair's cross-entropy: the same model."""
    if outputs.shape[1] == 2:
        return outputs[:, 1] - outputs[:, 0]
    return outputs.squeeze(1) if outputs.shape[1] == 1 else outputs
