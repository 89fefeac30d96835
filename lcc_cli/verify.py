"""`lcc verify`: run every integrity and compatibility check on a cartridge and report each.

The loader (format/cartridge.py) stops at the first defect; this runs the same public load
steps one by one and records pass / fail / skipped for each, so users see exactly which one
failed. Model checks need a loaded model; the probe (runtime/probe.py, handed in by api.py)
also needs the source document.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CartridgeError, LccError
from .format import cartridge as fmt
from .format import manifest as mf
from .format.checks import check_compatible, check_fingerprint


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped because an earlier check failed
    detail: str = ""


@dataclass
class VerifyReport:
    path: str
    format_version: int | None = None  # the version found in the file (1 is converted on load)
    checks: list[Check] = field(default_factory=list)
    probe: dict | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if c.ok is False), None)

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "format_version": self.format_version,
                "checks": [asdict(c) for c in self.checks], "probe": self.probe}


def verify_file(path: str | Path, loaded=None, source: str | Path | None = None, probe=None) -> VerifyReport:
    """Run the checks. `loaded` (a LoadedModel, or a function that loads one: called only
    once the file checks have passed) enables the model checks; `source` the source-hash
    check; `probe(cart, loaded, text) -> dict` (with both) the reconstruction-fidelity probe."""
    path = Path(path)
    report = VerifyReport(str(path))
    state: dict = {}

    def run(name: str, fn) -> None:
        if report.checks and report.checks[-1].ok is not True:
            report.checks.append(Check(name, None, "skipped"))
            return
        try:
            report.checks.append(Check(name, True, fn() or ""))
        except LccError as exc:
            report.checks.append(Check(name, False, exc.message))

    def parse():
        if not path.exists():
            raise CartridgeError(f"no such file: {path}")
        if not path.is_file():
            raise CartridgeError(f"{path} is not a regular file")
        state["raw"] = fmt.read_raw(path, path.name)
        state["meta"], state["manifest"] = fmt.read_manifest(state["raw"], path.name)
        return f"{state['raw'].size:,} bytes"

    def version():
        m = state["manifest"]
        v = m.get("format_version")
        if m.get("format") != mf.FORMAT_NAME or v not in mf.READABLE_VERSIONS:
            raise CartridgeError(f"format {str(m.get('format'))[:40]!r} version {str(v)[:12]}; this lcc reads "
                                 f"{mf.FORMAT_NAME!r} versions {', '.join(map(str, mf.READABLE_VERSIONS))}")
        report.format_version = v
        return f"{mf.FORMAT_NAME} v{v}" + (" (converted to v2 on load)" if v == 1 else "")

    def schema():
        mf.validate(state["manifest"], path.name)
        if state["manifest"].get("partial"):
            raise CartridgeError("an unfinished compile (partial file), not a cartridge")
        return "positions match the layout"

    def tensors():
        fmt.check_tensor_entries(state["raw"], state["manifest"], path.name)
        if state["manifest"]["format_version"] < 3:
            state["tensors"] = fmt.read_tensors(state["raw"], path.name)
        return f"{len(state['raw'].header) - ('__metadata__' in state['raw'].header)} tensors"

    def checksum():
        m = state["manifest"]
        if m["format_version"] < 3:
            return fmt.check_checksums(state["meta"], m, state["tensors"], path.name)[:16]
        state["table"], state["index"] = fmt.check_digests(state["raw"], state["meta"], m, path.name)
        return m["tensor_sha256"][:16]

    def blocks():
        m = state["manifest"]
        if m["format_version"] < 3:
            return f"v{m['format_version']}: one checksum over every tensor (above)"
        count = state["table"].shape[0]
        state["rows"] = fmt.read_blocks(state["raw"], m, state["table"], 0, count - 1, path.name)
        return f"{count} block{'s' if count != 1 else ''} of {m['buffer']['block_entries']} entries, each its sha256"

    def values():
        m = state["manifest"]
        if m["format_version"] < 3:
            largest = fmt.check_values(state["tensors"], path.name)
            state["cart"] = fmt.to_cartridge(m, state["tensors"])
        else:
            keys, vals, bias, largest = fmt.decode_rows(state["rows"], m, 0, path.name)
            state["cart"] = fmt.Cartridge(m, fmt.Buffer(keys, vals, fmt.positions(m), bias), state["index"] or None)
        return f"all finite, largest magnitude {largest:.3g}"

    run("parse", parse)
    run("version", version)
    run("schema", schema)
    run("tensors", tensors)
    run("checksum", checksum)
    run("blocks", blocks)
    run("values", values)
    cart = state.get("cart")
    if callable(loaded):
        loaded = loaded() if cart is not None else None  # no model load for a file that failed
        if loaded is None:
            report.checks += [Check("model-shape", None, "skipped"), Check("fingerprint", None, "skipped")]
    if loaded is not None:
        run("model-shape", lambda: check_compatible(cart.manifest["model"], loaded.facts,
                                                    cart.buffer.first_query_position, path.name))
        run("fingerprint", lambda: check_fingerprint(cart.manifest["model"], loaded.model_id, loaded.fingerprint,
                                                     path.name))
    if source is not None:
        run("source", lambda: _source(cart, Path(source)))
        if probe is not None and loaded is not None:
            run("probe", lambda: _probe(probe, cart, loaded, Path(source), report))
    return report


def _source(cart, source: Path) -> str:
    try:
        st = source.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CartridgeError(f"source {source} is not a regular file")
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
    except OSError as exc:
        raise CartridgeError(f"cannot read source {source}: {exc.strerror}") from exc
    if digest != cart.manifest["source"].get("sha256"):
        raise CartridgeError(f"{source.name} is not the document this cartridge was compiled from")
    return digest[:16]


def _probe(probe, cart, loaded, source: Path, report: VerifyReport) -> str:
    from .ingest import read_document

    report.probe = probe(cart, loaded, read_document(source).text)
    return f"reconstruction fidelity {report.probe['fidelity']:.1%} of {report.probe['tokens']} tokens"
