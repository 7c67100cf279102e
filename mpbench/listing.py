"""`mpbench list ...`: registries with one-line descriptions (and citations for methods)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def list_registry(what: str, console: Console, sites_model: str | None = None) -> None:
    table = Table(show_header=True)
    if what == "regularizers":
        from mpbench.regularization import REGULARIZERS

        if sites_model:
            _list_sites(sites_model, console)
            return
        for col in ("name", "description", "citation", "hparams (defaults)", "needs"):
            table.add_column(col, overflow="fold")
        for e in REGULARIZERS.entries():
            hp = ", ".join(f"{k}={v.default}" for k, v in e.obj.hparams.items())
            table.add_row(e.name, e.description, e.citation, hp, ", ".join(e.obj.requires))
    elif what == "models":
        import timm

        import mpbench.models as models

        for col in ("name", "description"):
            table.add_column(col)
        for name, desc in models.MODEL_DESCRIPTIONS.items():
            table.add_row(name, desc)
        table.caption = f"and any of timm's {len(timm.list_models())} architectures by name (pretrained=False)"
    elif what == "datasets":
        from mpbench.data import DATASETS

        for col in ("name", "description", "how to get"):
            table.add_column(col, overflow="fold")
        for e in DATASETS.entries():
            table.add_row(e.name, e.description, getattr(e.obj, "how_to_get", ""))
    elif what == "suites":
        from mpbench.config import load_yaml, suites_dir

        for col in ("name", "description"):
            table.add_column(col, overflow="fold")
        for p in sorted(suites_dir().glob("*.yaml")):
            table.add_row(p.stem, str(load_yaml(p).get("description", "")).strip())
    else:
        from mpbench.launchers import LAUNCHERS
        from mpbench.stages import STAGES

        reg = STAGES if what == "stages" else LAUNCHERS
        for col in ("name", "description"):
            table.add_column(col)
        for e in reg.entries():
            table.add_row(e.name, e.description)
    console.print(table)


def _list_sites(model_name: str, console: Console) -> None:
    import timm

    import mpbench.models  # noqa: F401
    from mpbench.errors import UsageError, did_you_mean
    from mpbench.sites import describe_sites

    if not timm.is_model(model_name):
        raise UsageError(f"unknown model {model_name!r}: {did_you_mean(model_name, timm.list_models())}")
    model = timm.create_model(model_name, num_classes=10)
    for line in describe_sites(model):
        console.print(line, highlight=False)
