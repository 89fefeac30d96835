"""`lcc verify`, `inspect`, `export` and `import`: cartridges as files."""

from __future__ import annotations

from pathlib import Path

from ..config import RunOptions
from ..errors import UsageError
from .common import load
from .compiling import CompileResult

def verify(path: Path, model: bool = True, run: RunOptions | None = None, source: Path | None = None,
           probe: bool = False):
    """Run verify.verify_file; model=False skips the model checks."""
    from ..verify import verify_file

    if probe and (source is None or not model):
        raise UsageError("--probe needs --source and the model (not --no-model)")
    from ..runtime.probe import probe_fidelity

    return verify_file(path, (lambda: load(run or RunOptions())) if model else None, source,
                       probe=probe_fidelity if probe else None)


def inspect(path: Path) -> dict:
    """The manifest of a cartridge, a compiler file or a reading-prefix file, checked as on
    load, plus file facts. A cartridge's `reading_prefix` is the prefix `lcc ask` reads before
    it by default (the shipped one, when it was trained for the cartridge's model), or None."""
    from ..format.cartridge import load_cartridge
    from ..format.compiler_file import is_compiler_file, load_compiler
    from ..format.prefix_file import is_prefix_file, load_prefix

    path = Path(path)
    if path.is_file() and is_compiler_file(path):
        comp = load_compiler(path)
        return {"path": str(path), "kind": "compiler", "bytes": path.stat().st_size, "sha256": comp.sha256,
                "manifest": comp.manifest}
    if path.is_file() and is_prefix_file(path):
        return {"path": str(path), "kind": "prefix", "bytes": path.stat().st_size,
                "manifest": load_prefix(path).manifest}
    cart = load_cartridge(path)
    size = path.stat().st_size
    tokens = cart.manifest["source"].get("token_count") or 0
    return {"path": str(path), "kind": "cartridge", "bytes": size, "manifest": cart.manifest,
            "bytes_per_token": round(size / tokens, 1) if tokens else None,
            "reading_prefix": _default_prefix(cart.fingerprint)}


def _default_prefix(fingerprint: str) -> str | None:
    from ..format.prefix_file import read_prefix_manifest
    from ..runtime.prefix import shipped_prefix

    shipped = shipped_prefix()
    if shipped is None:
        return None
    m = read_prefix_manifest(shipped)
    return f"{m['name']} ({m['tensor_sha256'][:12]})" if m["model"]["fingerprint"] == fingerprint else None


def export_cartridge(path: Path, to: str, out_dir: Path, force: bool = False, drop_bias: bool = False) -> Path:
    """`lcc export CART --to peft DIR`."""
    from ..export.peft import export_peft
    from ..format.cartridge import load_cartridge

    if to != "peft":
        raise UsageError(f"to must be peft (got {to!r})", field="to")
    return export_peft(load_cartridge(path), Path(out_dir), force=force, source=Path(path), drop_bias=drop_bias)


def import_adapter(directory: Path, output: Path, run: RunOptions | None = None, force: bool = False) -> CompileResult:
    """`lcc import DIR -o CART`: a PEFT Cartridge adapter (from lcc or trained elsewhere)
    becomes a cartridge pinned to the loaded model's fingerprint."""
    from .._version import __version__
    from ..format import manifest as mf
    from ..format.cartridge import Cartridge, check_values
    from ..format.checks import check_fingerprint
    from ..format.fsio import check_output
    from ..export.peft import read_peft

    from ..export.peft import ADAPTER_FILES, read_adapter_files

    output, directory = Path(output), Path(directory)
    files = read_adapter_files(directory)  # what can be checked without the model, before it loads
    inputs = tuple(directory / name for name in ADAPTER_FILES)
    check_output(output, force, inputs)  # before the model loads; never one of the adapter's own files
    loaded = load(run or RunOptions())
    buffer, theirs, sha = read_peft(directory, loaded.facts, files)
    check_values({f"{kind}.{i}": t for kind, ts in (("k", buffer.keys), ("v", buffer.values)) for i, t in enumerate(ts)},
                 directory.name)
    model = loaded.facts.to_manifest(loaded.model_id, loaded.fingerprint)
    rows = [{"index": 0, "slots": buffer.slots, "token_count": 0, "sink": False}]
    source = {"name": directory.name, "sha256": sha, "token_count": 0, "ratio": None}
    compile_, compiler, metrics = {}, {"name": "imported", "from": "peft", "sha256": sha}, {"segments": [{}]}
    if theirs is not None:
        # exported by lcc: keep its provenance, after checking it was made for this model
        check_fingerprint(theirs["model"], loaded.model_id, loaded.fingerprint, directory.name, force)
        segs = theirs["buffer"]["segments"]
        if sum(s["slots"] for s in segs) == buffer.slots:
            rows = [{k: s[k] for k in ("index", "slots", "token_count", "sink") if k in s} for s in segs]
        source, compile_, metrics = theirs["source"], theirs["compile"], theirs["metrics"]
        if buffer.bias is None and compile_.get("bias"):  # PEFT holds no biases: never record ones that are gone
            compile_ = {**compile_, "bias": False}
        compiler = {**theirs["compiler"], "imported_from": "peft"}
    m = mf.build(model=model, segments=rows, source=source, compile=compile_, compiler=compiler, metrics=metrics,
                 version=__version__, storage_dtype=str(buffer.dtype).removeprefix("torch."))
    cart = Cartridge(m, buffer)
    from ..format.cartridge import from_bytes, to_bytes

    data = to_bytes(cart)
    from_bytes(data, f"the adapter in {directory.name}")  # exactly the checks any later load runs
    from ..format.fsio import atomic_write

    atomic_write(output, data, overwrite=force, inputs=inputs)
    return CompileResult(str(output), cart.slots, source.get("token_count", 0), len(rows), 0.0, loaded.model_id,
                         compiler, [])

