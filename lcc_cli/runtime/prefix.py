"""The reading prefix: trained KV entries the frozen reader reads before every context turn.

It carries the *reading skill* (answer with the document's own short phrase; issue 38), not
a document: trained once per base model with the reader frozen (training/prefix.py), shipped
for the embedded model under lcc_cli/data/, pinned to the model's fingerprint. Every read of a
document puts it first (runtime/reading.py moves the rest after it): cartridges, libraries,
`--context`; the plain model answering with no document reads without it, so its answers stay
its own. `--no-prefix` reads without it. A model without a prefix trained for it reads without
one.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..buffer import Buffer
from ..errors import ModelMismatchError

SHIPPED = "reading-prefix-smollm2-135m.safetensors"


@dataclass
class ReadingPrefix:
    name: str  # what `--json` and `lcc inspect` report: the file and its digest
    buffer: Buffer  # at positions 0..entries-1, on the model's device and dtype
    manifest: dict

    @property
    def slots(self) -> int:
        return self.buffer.slots


def shipped_prefix() -> Path | None:
    path = Path(str(resources.files("lcc_cli").joinpath("data", SHIPPED)))
    return path if path.is_file() else None


def open_prefix(loaded, path: Path) -> ReadingPrefix:
    """A prefix file checked against the loaded model (shapes, RoPE and fingerprint)."""
    import torch

    from ..format.checks import check_compatible, check_fingerprint
    from ..format.prefix_file import load_prefix

    f = load_prefix(path)
    check_compatible(f.manifest["model"], loaded.facts, f.entries, f"reading prefix {path.name}")
    check_fingerprint(f.manifest["model"], loaded.model_id, loaded.fingerprint, f"reading prefix {path.name}",
                      hint="train one for this model with `lcc train-prefix`, or read with --no-prefix")
    buffer = Buffer(list(f.keys), list(f.values), torch.arange(f.entries)).to(loaded.device, loaded.dtype)
    name = f"{f.manifest['name']} ({f.manifest['tensor_sha256'][:12]})"
    return ReadingPrefix(name, buffer, f.manifest)


def reading_prefix(loaded, enabled: bool = True, path: str | Path | None = None) -> ReadingPrefix | None:
    """The prefix every read of this model puts first: `path`, or the shipped one when it was
    trained for this very model; None when disabled or there is none for this model. Each
    file is loaded once per model."""
    if not enabled:
        return None
    if path is not None:
        opened = loaded.__dict__.setdefault("_prefix_files", {})
        key = str(Path(path).resolve())
        if key not in opened:
            opened[key] = open_prefix(loaded, Path(path))
        return opened[key]
    cached = getattr(loaded, "_reading_prefix", False)
    if cached is not False:
        return cached
    found = None
    shipped = shipped_prefix()
    if shipped is not None:
        from ..format.prefix_file import read_prefix_manifest

        if read_prefix_manifest(shipped)["model"]["fingerprint"] == loaded.fingerprint:
            try:
                found = open_prefix(loaded, shipped)
            except ModelMismatchError:
                found = None
    loaded._reading_prefix = found
    return found
