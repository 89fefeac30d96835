"""`--compiler auto`: the method and settings per model and quality preset, read from a table
that a bench run produced (lcc_cli/data/auto.json, written by bench/auto_table.py, which
names the results it read).

Two rows: the embedded model, for which a pretrained compiler ships, and every other model
(`--model`), which gets the best method that needs no training within each preset's compile
budget, instead of ~1,000 prefills of per-document optimisation from scratch.
"""

from __future__ import annotations

import json
from importlib import resources

from ..errors import UsageError
from .base import CompilerSpec

TABLE = "auto.json"


def table() -> dict:
    return json.loads(resources.files("lcc_cli").joinpath("data", TABLE).read_text())


def choose(loaded, quality: str) -> tuple[CompilerSpec, str, dict]:
    """(compiler, its quality preset, settings on top) for `loaded` at `quality`: the
    pretrained row when the shipped compiler was trained for this very model, the any-model
    row otherwise."""
    from ..format.compiler_file import read_compiler_manifest
    from .pretrained import shipped_compiler

    rows = table()["rows"]
    path = shipped_compiler()
    fits = path is not None and read_compiler_manifest(path)["model"]["fingerprint"] == loaded.fingerprint
    row = rows["pretrained"] if fits else rows["any_model"]
    if quality not in row:
        raise UsageError(f"quality must be {', '.join(row)} (got {quality!r})", field="quality")
    entry = row[quality]
    spec = CompilerSpec(entry["compiler"], str(path) if entry["compiler"] == "pretrained" else None)
    return spec, entry.get("quality", quality), dict(entry.get("settings", {}))
