"""`mpbench list ...`: registries with one-line descriptions (and citations for methods).

Three renderings of the same rows: a rich table (for a terminal), plain lines (one entry per line, fields separated
by tabs, never wrapped: for ``grep``, ``cut`` and ``awk``) and JSON (a list of objects, one per entry).
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterable

import click
from rich.console import Console
from rich.table import Table

from mpbench.errors import UsageError

FORMATS = ("table", "plain", "json")


def default_format(console: Console) -> str:
    """A table on a terminal, plain lines when stdout is piped or redirected."""
    try:
        return "table" if console.file.isatty() else "plain"
    except (AttributeError, ValueError, OSError):
        return "plain"


def _one_line(value: Any) -> str:
    """A field as one plain-text line: no tabs or newlines (they would split the entry)."""
    return re.sub(r"\s+", " ", str(value)).strip()


def _text(value: Any) -> str:
    """How a field reads in the table and in plain lines (JSON keeps the structure)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "" if value is None else str(value)


def _regularizers() -> tuple[list[str], list[dict[str, Any]], str]:
    from mpbench.regularization import REGULARIZERS

    rows = [{"name": e.name, "description": e.description, "citation": e.citation,
             "hparams": {k: v.default for k, v in e.obj.hparams.items()}, "needs": list(e.obj.requires)}
            for e in REGULARIZERS.entries()]
    return ["name", "description", "citation", "hparams", "needs"], rows, ""


def _models() -> tuple[list[str], list[dict[str, Any]], str]:
    import timm

    import mpbench.models as models

    rows = [{"name": n, "description": d} for n, d in models.MODEL_DESCRIPTIONS.items()]
    return ["name", "description"], rows, \
        f"and any of timm's {len(timm.list_models())} architectures by name (pretrained=False)"


def _datasets() -> tuple[list[str], list[dict[str, Any]], str]:
    from mpbench.data import DATASETS

    rows = [{"name": e.name, "description": e.description, "image_size": getattr(e.obj, "default_image_size", None),
             "how_to_get": getattr(e.obj, "how_to_get", "")} for e in DATASETS.entries()]
    return ["name", "description", "image_size", "how_to_get"], rows, "image_size: what runs see when a suite sets " \
        "no data.image_size"


def _suites() -> tuple[list[str], list[dict[str, Any]], str]:
    from mpbench.config import load_yaml, suites_dir

    rows = []
    for p in sorted(suites_dir().glob("*.yaml")):
        try:
            desc = str(load_yaml(p).get("description", "")).strip()
        except UsageError as e:                      # one broken suite file does not hide the others
            desc = f"(unreadable: {e})"
        rows.append({"name": p.stem, "description": desc})
    return ["name", "description"], rows, ""


def registry_rows(entries: Iterable[Any]) -> tuple[list[str], list[dict[str, Any]], str]:
    """Any registry: each entry has ``.name`` and ``.description``."""
    return ["name", "description"], [{"name": e.name, "description": e.description} for e in entries], ""


def _jobs() -> tuple[list[str], list[dict[str, Any]], str]:
    from mpbench.jobs import JOB_KINDS

    rows = [{"name": e.name, "description": e.description,
             "section": f"stages.{e.name}" if e.obj.is_stage() else "grid", "payload": e.obj.payload or ""}
            for e in JOB_KINDS.entries()]
    return ["name", "description", "section", "payload"], rows, ""


def _evals() -> tuple[list[str], list[dict[str, Any]], str]:
    from mpbench.evals import EVALS

    rows = [{"name": e.name, "description": e.description,
             "metrics": {m.name: f"{m.display}{' (' + m.unit + ')' if m.unit else ''}, "
                                 f"{m.direction + ' is better' if m.direction else 'unranked'}"
                                 f"{', ' + m.kind if m.kind != 'scalar' else ''}" for m in e.obj.metrics},
             "settings": {k: v.default for k, v in e.obj.settings.items()}, "citation": e.citation}
            for e in EVALS.entries()]
    return ["name", "description", "metrics", "settings", "citation"], rows, ""


def _launchers() -> tuple[list[str], list[dict[str, Any]], str]:
    from mpbench.launchers import LAUNCHERS

    return registry_rows(LAUNCHERS.entries())


SOURCES: dict[str, Callable[[], tuple[list[str], list[dict[str, Any]], str]]] = {
    "regularizers": _regularizers, "models": _models, "datasets": _datasets, "suites": _suites,
    "jobs": _jobs, "stages": _jobs, "evals": _evals, "launchers": _launchers,
}
HEADERS = {"hparams": "hparams (defaults)", "how_to_get": "how to get", "image_size": "default px"}


def render(columns: list[str], rows: list[dict[str, Any]], fmt: str, console: Console, caption: str = "") -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1, default=str))
    elif fmt == "plain":
        for row in rows:
            click.echo("\t".join(_one_line(_text(row[c])) for c in columns))
    else:
        table = Table(show_header=True, caption=caption or None)
        for c in columns:
            table.add_column(HEADERS.get(c, c), overflow="fold")
        for row in rows:
            table.add_row(*(_text(row[c]) for c in columns))
        console.print(table)


def list_registry(what: str, console: Console, sites_model: str | None = None, fmt: str | None = None) -> None:
    fmt = fmt or default_format(console)
    if fmt not in FORMATS:
        raise UsageError(f"unknown list format {fmt!r}: use one of {', '.join(FORMATS)}")
    if sites_model:
        if what != "regularizers":
            raise UsageError(f"--sites MODEL goes with `mpbench list regularizers`, not `list {what}`")
        _list_sites(sites_model, console, fmt)
        return
    if what not in SOURCES:
        raise UsageError(f"cannot list {what!r}: use one of {', '.join(SOURCES)}")
    columns, rows, caption = SOURCES[what]()
    render(columns, rows, fmt, console, caption)


def _list_sites(model_name: str, console: Console, fmt: str = "plain") -> None:
    import timm

    import mpbench.models  # noqa: F401
    from mpbench.errors import did_you_mean
    from mpbench.sites import KINDS, describe_sites, list_sites, site_kinds

    if not timm.is_model(model_name):
        raise UsageError(f"unknown model {model_name!r}: {did_you_mean(model_name, timm.list_models())}")
    model = timm.create_model(model_name, num_classes=10)
    if fmt == "json":
        kinds = site_kinds(model)
        sites = [{"name": s.name, "kind": s.kind, "stage": s.stage, "channels": s.channels}
                 for k in KINDS if k in kinds for s in list_sites(model, k)]
        click.echo(json.dumps(sites, indent=1))
        return
    for line in describe_sites(model):              # aligned columns already: never wrapped, on a terminal too
        click.echo(line)
