"""Cartridges as PEFT Cartridge adapters, both ways.

A v2 cartridge is a KV prefix at positions 0..K-1 with the question at K, which is exactly
what PEFT's `CartridgeConfig` adapter serves as `past_key_values`: so export is a reshape,
and `PeftModel.from_pretrained(base_model, DIR)` reads the result with no lcc installed.

The adapter's one tensor `prompt_embeddings` is [K, num_layers * 2 * kv_heads * head_dim]:
per entry t, layer 0's key (all kv heads), layer 0's value, layer 1's key, and so on.
`adapter_config.json` must carry `"task_type": "CAUSAL_LM"`: without it PEFT builds a plain
PeftModel that silently ignores the prefix. lcc's manifest rides beside the adapter, as
`lcc_manifest.json` and in the safetensors metadata (PEFT ignores both).
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import torch

from ..buffer import Buffer
from ..errors import CartridgeError, OutputExistsError, UsageError
from ..format.cartridge import Cartridge, relayout
from ..format.fsio import atomic_write

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MANIFEST = "lcc_manifest.json"
ADAPTER_FILES = (CONFIG, WEIGHTS, MANIFEST)


def pack(buffer: Buffer) -> torch.Tensor:
    """[K, L*2*H*D]: per entry, each layer's key then value (all kv heads)."""
    stacked = torch.stack([t for kv in zip(buffer.keys, buffer.values) for t in kv])  # [2L, H, K, D]
    return stacked.permute(2, 0, 1, 3).reshape(buffer.slots, -1).contiguous()


def unpack(embeddings: torch.Tensor, layers: int, kv_heads: int, head_dim: int) -> Buffer:
    k = embeddings.shape[0]
    if embeddings.shape[1] != layers * 2 * kv_heads * head_dim:
        raise CartridgeError(f"adapter tensor is {list(embeddings.shape)}, expected [{k}, "
                             f"{layers * 2 * kv_heads * head_dim}] for this model")
    x = embeddings.reshape(k, layers, 2, kv_heads, head_dim)
    keys = [x[:, i, 0].permute(1, 0, 2).contiguous() for i in range(layers)]
    values = [x[:, i, 1].permute(1, 0, 2).contiguous() for i in range(layers)]
    return Buffer(keys, values, torch.arange(k))


def export_peft(cart: Cartridge, out_dir: Path, force: bool = False, source: Path | None = None,
                drop_bias: bool = False) -> Path:
    """Write a PEFT Cartridge adapter directory for `cart` (read from `source`, which is
    never overwritten). Every target is checked before anything is written; the three files
    are staged in a temporary folder and moved into place together (a new directory is one
    rename). PEFT's prefix format has no attention biases: a cartridge with them is refused
    unless `drop_bias`, which exports its keys and values alone (it then answers differently)."""
    if cart.manifest.get("index"):
        raise UsageError("this cartridge is indexed: each question reads its own pages, and a PEFT Cartridge adapter "
                         "is one fixed prefix read by every question",
                         hint="compile the document without --index to export it")
    if cart.buffer.bias is not None:
        if not drop_bias:
            raise UsageError("this cartridge carries attention biases, which a PEFT Cartridge adapter cannot hold",
                             hint="pass --drop-bias to export its keys and values without them (answers change: "
                                  "see README)")
        # the record says what the adapter holds: no biases, and that they were dropped here
        m = cart.manifest
        cart = Cartridge({**m, "buffer": {k: v for k, v in m["buffer"].items() if k != "bias"},
                          "compile": {**m.get("compile", {}), "bias": False},
                          "compiler": {**m.get("compiler", {}), "biases_dropped": True}},
                         cart.buffer.without_bias())
    import os
    import shutil
    import tempfile

    from safetensors.torch import save

    from ..format.fsio import check_output

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a directory")
    fresh = not out_dir.exists() or not any(out_dir.iterdir())
    if not fresh and not force:
        raise OutputExistsError(f"{out_dir} exists and is not empty", hint="pass --force to overwrite its files")
    for name in (WEIGHTS, MANIFEST, CONFIG):
        if (out_dir / name).exists() or (out_dir / name).is_symlink():
            check_output(out_dir / name, True, (source,) if source else ())
    if cart.buffer.positions.tolist() != list(range(cart.slots)):
        cart = relayout(cart)  # a converted multi-segment v1 file: PEFT needs one 0..K-1 prefix
    m = cart.manifest
    config = {"peft_type": "CARTRIDGE", "task_type": "CAUSAL_LM", "num_virtual_tokens": cart.slots,
              "num_frozen_tokens": 1 if cart.segments[0].get("sink") else 0,
              "num_layers": m["model"]["num_layers"], "num_attention_heads": m["model"]["num_kv_heads"],
              "token_dim": m["model"]["num_kv_heads"] * m["model"]["head_dim"], "num_transformer_submodules": 1,
              "inference_mode": True, "base_model_name_or_path": m["model"]["id"]}
    files = {WEIGHTS: save({"prompt_embeddings": pack(cart.buffer)},
                           metadata={"format": "pt", "lcc_manifest": json.dumps(m, sort_keys=True)}),
             MANIFEST: json.dumps(m, indent=1, sort_keys=True).encode(),
             CONFIG: json.dumps(config, indent=2).encode()}
    parent = out_dir if not fresh else out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name[:40]}.", suffix=".export", dir=parent))
    except OSError as exc:
        raise UsageError(f"cannot create {out_dir}: {exc.strerror}") from exc
    try:
        for name, data in files.items():
            atomic_write(stage / name, data)
        if fresh:
            os.chmod(stage, 0o755)
            if out_dir.exists():
                out_dir.rmdir()  # empty, checked above
            os.rename(stage, out_dir)
        else:
            for name in files:  # same filesystem: each move is atomic, and all were checked first
                os.replace(stage / name, out_dir / name)
    except OSError as exc:
        raise UsageError(f"cannot write {out_dir}: {exc.strerror}") from exc
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return out_dir


# An adapter's JSON files are read whole: a config is a few hundred bytes and lcc's manifest
# a few hundred kilobytes at most, so anything far larger is refused before it is read.
MAX_JSON_BYTES = 8 << 20


def check_adapter_dir(directory: Path) -> None:
    """The adapter's files are there and regular (cheap; before a model loads). lcc's
    manifest is optional, but when present it is read, so it must be a regular file too."""
    for name in (CONFIG, WEIGHTS, MANIFEST):
        path = directory / name
        try:
            st = path.stat()
        except FileNotFoundError:
            if path.is_symlink():
                raise CartridgeError(f"{path} is a dangling symbolic link") from None
            if name == MANIFEST:
                continue
            if name == CONFIG:
                raise CartridgeError(f"{directory} is not a PEFT adapter directory (no {CONFIG})") from None
            raise CartridgeError(f"{directory} has no {WEIGHTS}",
                                 hint="lcc reads safetensors only, never pickled .bin") from None
        except OSError as exc:  # a symbolic-link loop, a permission
            raise CartridgeError(f"cannot read {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise CartridgeError(f"{path} is not a regular file (a device, directory or pipe?)")


def _read_json(path: Path):
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CartridgeError(f"{path.name} is {size:,} bytes; an adapter's JSON files are at most "
                                 f"{MAX_JSON_BYTES:,}")
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:  # a device or a file that grew: stat said nothing useful
            raise CartridgeError(f"{path.name} is larger than {MAX_JSON_BYTES:,} bytes")
        return json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CartridgeError(f"{path.name} is not valid JSON") from exc


def _lcc_manifest_problem(m) -> str | None:
    """What is missing from an adapter's lcc_manifest.json (the fields import keeps), or None."""
    if not isinstance(m, dict):
        return "not a table"
    model, buffer = m.get("model"), m.get("buffer")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str) or not isinstance(model.get("id"), str):
        return "model.id and model.fingerprint"
    if (not isinstance(buffer, dict) or not isinstance(buffer.get("segments"), list)
            or not all(isinstance(s, dict) and isinstance(s.get("slots"), int) for s in buffer["segments"])):
        return "buffer.segments"
    missing = [k for k in ("source", "compile", "metrics", "compiler") if not isinstance(m.get(k), dict)]
    return ", ".join(missing) or None


def read_adapter_files(directory: Path) -> tuple[dict, dict | None]:
    """The adapter's config and lcc's manifest (None when it has none), checked as far as
    they can be without the model: cheap, so import runs it before the model loads."""
    directory = Path(directory)
    check_adapter_dir(directory)
    config = _read_json(directory / CONFIG)
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if not isinstance(kind, str):
        raise CartridgeError(f"{directory}: {CONFIG} names no peft_type; not a PEFT Cartridge adapter")
    if kind != "CARTRIDGE":
        raise CartridgeError(f"{directory} holds a {kind[:20]!r} adapter, not a PEFT Cartridge")
    for key in ("num_layers", "num_attention_heads", "token_dim", "num_virtual_tokens"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise CartridgeError(f"{CONFIG}: {key} must be a positive integer")
    manifest = None
    if (directory / MANIFEST).exists():
        # Only lcc writes this file; one that is there but unreadable or incomplete is refused
        # rather than dropped, because import keeps its provenance and checks its model.
        manifest = _read_json(directory / MANIFEST)
        problem = _lcc_manifest_problem(manifest)
        if problem:
            raise CartridgeError(f"{directory.name}/{MANIFEST} is not a manifest lcc wrote (bad or missing: "
                                 f"{problem})", hint=f"remove {MANIFEST} to import the adapter without it")
    return config, manifest


def read_peft(directory: Path, facts, files: tuple[dict, dict | None] | None = None) -> tuple[Buffer, dict | None, str]:
    """The buffer in a PEFT Cartridge adapter directory, lcc's manifest if it carries one,
    and the sha256 of its weights. Shapes missing from the config come from `facts`.
    `files`: read_adapter_files' result, when the caller has it already."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config, manifest = files or read_adapter_files(directory)
    weights = directory / WEIGHTS

    def number(key, default):
        value = config.get(key)
        return default if value is None else value

    layers = number("num_layers", facts.num_layers)
    heads = number("num_attention_heads", facts.num_kv_heads)
    token_dim = number("token_dim", facts.num_kv_heads * facts.head_dim)
    if token_dim % heads:
        raise CartridgeError(f"{CONFIG}: token_dim {token_dim} is not divisible by num_attention_heads {heads}")
    head_dim = token_dim // heads
    virtual = number("num_virtual_tokens", None)
    if virtual is not None and facts.max_positions and virtual >= facts.max_positions:
        raise CartridgeError(f"{CONFIG}: {virtual:,} virtual tokens do not fit the model's "
                             f"{facts.max_positions:,}-position window")
    if (layers, heads, head_dim) != (facts.num_layers, facts.num_kv_heads, facts.head_dim):
        raise CartridgeError(f"the adapter is for {layers} layers x {heads} kv heads x head dim {head_dim}; "
                             f"the model has {facts.num_layers} x {facts.num_kv_heads} x {facts.head_dim}")
    try:
        data = weights.read_bytes()
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise CartridgeError(f"cannot read {weights.name}: {exc}".splitlines()[0][:160]) from exc
    embeddings = tensors.get("prompt_embeddings")
    if embeddings is None or embeddings.dim() != 2 or not embeddings.is_floating_point() or not embeddings.shape[0]:
        raise CartridgeError(f"{weights.name} has no non-empty 2-D prompt_embeddings tensor")
    if embeddings.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        embeddings = embeddings.float()
    if virtual not in (None, embeddings.shape[0]):
        raise CartridgeError("num_virtual_tokens disagrees with the adapter tensor")
    if facts.max_positions and embeddings.shape[0] >= facts.max_positions:
        raise CartridgeError(f"the adapter's {embeddings.shape[0]:,} entries do not fit the model's "
                             f"{facts.max_positions:,}-position window")
    return unpack(embeddings, layers, heads, head_dim), manifest, hashlib.sha256(data).hexdigest()
