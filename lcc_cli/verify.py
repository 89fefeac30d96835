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


# Long for a reason: each file check is a small step over the state the previous one left (the
# raw header, then the manifest, then the tensors...), written in the order it runs, so that the
# sequence reads top to bottom as docs/format.md lists it.
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
    indexed = cart is not None and "index" in cart.manifest
    if indexed:
        run("index", lambda: _index(cart))
    if callable(loaded):
        loaded = loaded() if cart is not None else None  # no model load for a file that failed
        if loaded is None:
            report.checks += [Check("model-shape", None, "skipped"), Check("fingerprint", None, "skipped")]
    if loaded is not None:
        _model_checks(run, cart, loaded, path.name, indexed)
    if source is not None:
        run("source", lambda: _source(cart, Path(source)))
        if probe is not None and loaded is not None:
            run("probe", lambda: _probe(probe, cart, loaded, Path(source), report))
    return report


def _model_checks(run, cart, loaded, name: str, indexed: bool) -> None:
    """The checks that need the model: it fits (shape, RoPE, window), it is the one the
    cartridge names, and an indexed cartridge's pages say what they store."""
    run("model-shape", lambda: check_compatible(cart.manifest["model"], loaded.facts,
                                                cart.buffer.first_query_position, name))
    run("fingerprint", lambda: check_fingerprint(cart.manifest["model"], loaded.model_id, loaded.fingerprint, name))
    if indexed:
        run("tokens", lambda: _tokens(cart, loaded))
        run("page-text", lambda: _page_text(cart, loaded))
        run("page-kv", lambda: _page_kv(cart, loaded))


def _index(cart) -> str:
    """An indexed cartridge's page table against its entries: pages exist, lie inside one
    encoding window each, and every index entry has its token id."""
    m = cart.manifest
    index, gist = m["index"], sum(s["slots"] for s in m["buffer"]["segments"])
    pages, windows = index["pages"], index["windows"]
    if not pages:
        raise CartridgeError("an indexed cartridge with no pages: no question could read anything")
    ids = (cart.index_tensors or {}).get("index.token_ids")
    entries = m["buffer"]["total_slots"] - gist
    if ids is None or ids.numel() != entries:
        raise CartridgeError(f"index.token_ids holds {0 if ids is None else ids.numel()} ids for {entries} entries")
    spans = [(gist + w["entry_start"], gist + w["entry_start"] + w["entries"]) for w in windows]
    for n, p in enumerate(pages):
        if not any(a <= p["start"] and p["start"] + p["entries"] <= b for a, b in spans) or p["entries"] < 1:
            raise CartridgeError(f"page {n} (entries {p['start']}..{p['start'] + p['entries'] - 1}) lies outside "
                                 f"its cartridge's windows")
    return f"{len(pages)} pages in {len(windows)} window{'s' if len(windows) != 1 else ''}"


def _page_ids(cart, page: dict) -> list[int]:
    gist = sum(s["slots"] for s in cart.manifest["buffer"]["segments"])
    return cart.index_tensors["index.token_ids"][page["start"] - gist: page["start"] - gist + page["entries"]].tolist()


def _tokens(cart, loaded) -> str:
    """Token ids inside the model's vocabulary, and no special token (a turn marker such as
    <|im_end|><|im_start|>system) inside a page: a page is document text."""
    from .serve.prompt import special_ids

    ids = cart.index_tensors["index.token_ids"]
    vocab = loaded.model.config.vocab_size
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
        raise CartridgeError(f"token ids run outside the model's {vocab}-token vocabulary")
    specials = special_ids(loaded.tokenizer)
    for n, page in enumerate(cart.manifest["index"]["pages"]):
        marked = [t for t in _page_ids(cart, page) if t in specials]
        if marked:
            raise CartridgeError(f"page {n} holds special tokens the model reads as turn markers "
                                 f"({loaded.tokenizer.decode(marked[:3])!r})")
    return f"{ids.numel():,} ids, none special inside a page"


def _page_text(cart, loaded) -> str:
    """Each page's text is what its stored token ids decode to: what `--show-pages` prints
    is what the model reads."""
    for n, page in enumerate(cart.manifest["index"]["pages"]):
        text = loaded.tokenizer.decode(_page_ids(cart, page), skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False).strip()
        if text != page["text"].strip():
            raise CartridgeError(f"page {n}'s text is not what its token ids say ({page['text'][:40]!r} against "
                                 f"{text[:40]!r})")
    return f"{len(cart.manifest['index']['pages'])} pages match their token ids"


# How far a re-encoded entry may sit from the stored one, as a share of the page's largest
# magnitude: int4 keeps about 1/30 of a range, int8 1/254; float storage only the compute's noise.
KV_TOLERANCE = {"int4": 0.25, "int8": 0.05}


def _page_kv(cart, loaded) -> str:
    """Every page's keys and values against the document's tokens encoded again, window by
    window as the compile encoded them (one prefill of the document): a page whose KV was
    swapped, edited or computed from other tokens fails."""
    from .compile.index import _encode
    from .config import CompileConfig

    m = cart.manifest
    index, gist = m["index"], sum(s["slots"] for s in m["buffer"]["segments"])
    ids = cart.index_tensors["index.token_ids"].tolist()
    (h0, h1), (t0, t1) = index["always"][0], index["always"][-1]
    header, tail = h1 - h0, (t1 - t0) if len(index["always"]) > 1 else 0
    windows = [(w["entry_start"], w["entry_start"] + w["entries"], max(0, w["position_start"] - header) if i else 0)
               for i, w in enumerate(index["windows"])]
    cfg = CompileConfig(window_mode=index.get("window_mode", "prefix"))
    keys, values, _, _ = _encode(loaded, ids, header, tail, windows, cfg)
    limit = KV_TOLERANCE.get(m["buffer"]["dtype"], 0.02)
    worst = 0.0
    for n, page in enumerate(index["pages"]):
        a, b = page["start"] - gist, page["start"] - gist + page["entries"]
        for layer in range(len(keys)):
            for fresh, stored in ((keys[layer], cart.buffer.keys[layer]), (values[layer], cart.buffer.values[layer])):
                want, got = fresh[:, a:b].float(), stored[:, gist + a:gist + b].float()
                err = float((want - got).abs().max() / want.abs().max().clamp(min=1e-6))
                worst = max(worst, err)
                if err > limit:
                    raise CartridgeError(f"page {n}'s keys and values are not those of its tokens (layer {layer}: "
                                         f"{err:.0%} off, at most {limit:.0%} for {m['buffer']['dtype']} storage)")
    return f"every page within {worst:.1%} of its tokens encoded again"


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
