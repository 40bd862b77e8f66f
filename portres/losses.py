"""Softmax cross-entropy on NumPy arrays: the one definition the float64 reference, its backward
pass, evaluation and the gradient experiments share.

    >>> import numpy as np
    >>> round(float(softmax_cross_entropy(np.zeros((2, 4)), np.full((2, 4), 0.25))), 6)  # log(4)
    1.386294
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log(softmax(logits))`` over axis 1, shifted by each row's maximum so ``exp`` cannot overflow.

        >>> log_softmax(np.array([[0.0, 0.0]]))
        array([[-0.69314718, -0.69314718]])
    """
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax over axis 1 (rows sum to 1).

        >>> softmax(np.array([[0.0, 0.0]]))
        array([[0.5, 0.5]])
    """
    shifted = logits - logits.max(1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)


def softmax_cross_entropy(logits: np.ndarray, targets: np.ndarray):
    """Mean cross-entropy of ``logits`` ``(N, K)`` against soft ``targets`` (rows summing to 1)."""
    return -(targets * log_softmax(logits)).sum(1).mean()


def softmax_cross_entropy_grad(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Gradient of :func:`softmax_cross_entropy` with respect to the logits: ``(softmax - targets) / N``."""
    return (softmax(logits) - targets) / logits.shape[0]
