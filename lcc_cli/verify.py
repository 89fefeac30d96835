"""`lcc verify`: run every integrity and compatibility check on a cartridge and report each.

Unlike `load_cartridge`, which stops at the first defect, this runs the checks in order
and records pass / fail / skipped for each, so users see exactly which one failed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from . import cartridge as fmt
from .errors import LccError


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped because an earlier check failed
    detail: str = ""


def verify_file(path: str | Path, loaded=None, source: str | Path | None = None,
                probe: bool = False) -> tuple[list[Check], object]:
    """Run the checks. `loaded` (a LoadedModel) enables the model checks; `source` the
    source-hash check, and `probe` (with both) the reconstruction-fidelity probe. Returns
    the checks and the probe result (None without a probe)."""
    path = Path(path)
    checks: list[Check] = []
    state: dict = {}

    def run(name: str, fn) -> bool:
        if checks and checks[-1].ok is not True and name in _DEPENDENT:
            checks.append(Check(name, None, "skipped"))
            return False
        try:
            checks.append(Check(name, True, fn() or ""))
            return True
        except LccError as exc:
            checks.append(Check(name, False, exc.message))
            return False

    def parse():
        try:
            state["data"] = path.read_bytes() if path.is_file() else _missing(path)
        except OSError as exc:
            raise fmt.CartridgeError(f"cannot read {path}: {exc.strerror}") from exc
        state["meta"], state["manifest"] = fmt.read_manifest(state["data"], path.name)
        return f"{len(state['data']):,} bytes"

    def version():
        m = state["manifest"]
        v = m.get("format_version")
        if m.get("format") != fmt.FORMAT_NAME or v != fmt.FORMAT_VERSION:
            raise fmt.CartridgeError(f"format {m.get('format')!r} version {v!r}; expected "
                                     f"{fmt.FORMAT_NAME!r} version {fmt.FORMAT_VERSION}")
        return f"{fmt.FORMAT_NAME} v{v}"

    def schema():
        fmt.validate_manifest(state["manifest"], path.name)
        if state["manifest"].get("partial"):
            raise fmt.CartridgeError("an unfinished compile (partial file), not a cartridge")

    def checksum():
        state["tensors"] = fmt._load_tensors(state["data"], path.name)
        digest = fmt.tensor_sha256(state["tensors"])
        if digest != state["manifest"]["tensor_sha256"]:
            raise fmt.CartridgeError("tensor sha256 differs from the manifest")
        if state["meta"].get("lcc_checksum") != fmt._checksum(state["meta"]["lcc_manifest"], digest):
            raise fmt.CartridgeError("manifest checksum differs (manifest edited)")
        return digest[:16]

    def shapes():
        kv = fmt._check_shapes(state["manifest"], state["tensors"], path.name)
        state["cart"] = fmt.Cartridge(state["manifest"], kv)
        return f"{len(kv)} layers x {state['cart'].slots} slots"

    run("parse", parse)
    run("version", version)
    run("schema", schema)
    run("checksum", checksum)
    run("shapes", shapes)
    cart = state.get("cart")
    if loaded is not None:
        run("model-shape", lambda: _model_shape(cart, loaded))
        run("fingerprint", lambda: _fingerprint(cart, loaded))
    if source is not None:
        run("source", lambda: _source(cart, Path(source)))
        if probe and loaded is not None:
            run("probe", lambda: _probe(cart, loaded, Path(source), state))
    state.pop("data", None)
    return checks, state.get("probe")


def _probe(cart, loaded, source: Path, state: dict) -> str:
    from .ingest import read_document

    result = probe_fidelity(cart, loaded, read_document(source).text)
    state["probe"] = result
    return f"reconstruction fidelity {result['fidelity']:.1%} of {result['tokens']} tokens"


# Checks that make no sense once an earlier one failed.
_DEPENDENT = {"version", "schema", "checksum", "shapes", "model-shape", "fingerprint", "source", "probe"}


def _missing(path: Path):
    raise fmt.CartridgeError(f"no such file: {path}")


def _model_shape(cart, loaded) -> str:
    return fmt.check_compatible(cart, loaded.facts)


def _fingerprint(cart, loaded) -> str:
    want = cart.manifest["model"]["fingerprint"]
    if want != loaded.fingerprint:
        raise fmt.ModelMismatchError(f"made for {cart.manifest['model']['id']} ({want[:12]}), "
                                     f"loaded {loaded.model_id} ({loaded.fingerprint[:12]})")
    return want[:16]


def _source(cart, source: Path) -> str:
    try:
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
    except OSError as exc:
        raise fmt.CartridgeError(f"cannot read source {source}: {exc.strerror}") from exc
    if digest != cart.manifest["source"].get("sha256"):
        raise fmt.CartridgeError(f"{source.name} is not the document this cartridge was compiled from")
    return digest[:16]


def probe_fidelity(cart, loaded, source_text: str) -> dict:
    """Reconstruction fidelity: the fraction of the source's tokens that the cartridge
    reproduces, teacher-forced (the reader, given each segment's buffer and the "repeat the
    document" instruction, predicts every next source token; we count exact hits)."""
    import torch

    from .build import document_segments, split_segments_of
    from .config import CompileConfig
    from .kvcache import forward, make_cache
    from .prompts import RECONSTRUCT_INSTRUCTION, Prompter

    settings = dict(cart.manifest["compile"])
    settings["lora_targets"] = tuple(settings.get("lora_targets", ()))
    cfg = CompileConfig(**{k: v for k, v in settings.items() if k in CompileConfig.__dataclass_fields__})
    texts = document_segments(loaded, source_text, cfg)
    segments = split_segments_of(cart)
    if len(texts) != len(segments):
        raise fmt.CartridgeError(f"source splits into {len(texts)} segments, cartridge has {len(segments)}")
    p = Prompter(loaded.tokenizer)
    prompt = p.query_ids(RECONSTRUCT_INSTRUCTION)
    hits = total = 0
    with torch.inference_mode():
        for index, text in enumerate(texts):
            seg = segments[index]
            target = p.document_ids(text)
            device = loaded.model.device
            cache = make_cache([(k[None].to(device), v[None].to(device)) for k, v in seg.kv])
            logits = forward(loaded.model, cache, seg.position_start + seg.slots,
                             input_ids=torch.tensor([prompt + target], device=device))[0]
            pred = logits[len(prompt) - 1: len(prompt) + len(target) - 1].argmax(-1)
            hits += int((pred == torch.tensor(target, device=device)).sum())
            total += len(target)
    return {"fidelity": hits / total, "tokens": total, "segments": len(texts)}
