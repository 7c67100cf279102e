"""No regularization: the reference row of every table."""
from __future__ import annotations

from mpbench.regularization import Regularizer, register_regularizer


@register_regularizer("base")
class Base(Regularizer):
    """No regularization (plain cross-entropy training); the baseline every method is compared against.

    Placement: none. Evaluation: one deterministic pass.
    """

    citation = "no regularization (baseline)"
    display = "Base"
    hparams = {}
