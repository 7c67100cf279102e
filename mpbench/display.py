"""Display names of table labels: each registry's own (``Regularizer.display``, ``DatasetSource.display``, the
models' ``MODEL_DISPLAY``), overridden by a suite's ``report.labels``. Stacks read as their parts joined with " + "
(``finetune_bnreset+metaperturb`` -> ``FT + MetaPerturb``); a variant keeps its keys (``Dropout (p=0.1)``)."""
from __future__ import annotations

from typing import Any, Mapping


def registry_labels() -> dict[str, str]:
    """Every registered name that declares a display name."""
    from mpbench.data import DATASETS
    from mpbench.models import MODEL_DISPLAY
    from mpbench.regularization import REGULARIZERS

    out: dict[str, str] = dict(MODEL_DISPLAY)
    for registry in (REGULARIZERS, DATASETS):
        out.update({e.name: e.obj.display for e in registry.entries() if getattr(e.obj, "display", None)})
    return out


def display(value: Any, labels: Mapping[str, str]) -> str:
    """How ``value`` reads in a table under ``labels``."""
    text = str(value)
    if text in labels:
        return labels[text]
    base, sep, rest = text.partition(" (")
    if sep:
        return f"{display(base, labels)} ({rest}"
    if "+" in text:
        return " + ".join(labels.get(part, part) for part in text.split("+"))
    return text
