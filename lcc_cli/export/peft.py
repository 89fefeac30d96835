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
from pathlib import Path

import torch

from ..buffer import Buffer
from ..errors import CartridgeError, OutputExistsError, UsageError
from ..format.cartridge import Cartridge, relayout
from ..format.fsio import atomic_write

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MANIFEST = "lcc_manifest.json"


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


def export_peft(cart: Cartridge, out_dir: Path, force: bool = False) -> Path:
    """Write a PEFT Cartridge adapter directory for `cart`."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise OutputExistsError(f"{out_dir} exists and is not empty", hint="pass --force to overwrite its files")
    if cart.buffer.positions.tolist() != list(range(cart.slots)):
        cart = relayout(cart)  # a converted multi-segment v1 file: PEFT needs one 0..K-1 prefix
    m = cart.manifest
    config = {"peft_type": "CARTRIDGE", "task_type": "CAUSAL_LM", "num_virtual_tokens": cart.slots,
              "num_frozen_tokens": 1 if cart.segments[0].get("sink") else 0,
              "num_layers": m["model"]["num_layers"], "num_attention_heads": m["model"]["num_kv_heads"],
              "token_dim": m["model"]["num_kv_heads"] * m["model"]["head_dim"], "num_transformer_submodules": 1,
              "inference_mode": True, "base_model_name_or_path": m["model"]["id"]}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out_dir}: {exc.strerror}") from exc
    text = json.dumps(m, sort_keys=True)
    atomic_write(out_dir / WEIGHTS, save({"prompt_embeddings": pack(cart.buffer)},
                                         metadata={"format": "pt", "lcc_manifest": text}))
    atomic_write(out_dir / MANIFEST, json.dumps(m, indent=1, sort_keys=True).encode())
    atomic_write(out_dir / CONFIG, json.dumps(config, indent=2).encode())
    return out_dir


def read_peft(directory: Path, facts) -> tuple[Buffer, dict | None, str]:
    """The buffer in a PEFT Cartridge adapter directory, lcc's manifest if it carries one,
    and the sha256 of its weights. Shapes missing from the config come from `facts`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights = directory / CONFIG, directory / WEIGHTS
    if not config_path.is_file():
        raise CartridgeError(f"{directory} is not a PEFT adapter directory (no {CONFIG})")
    if not weights.is_file():
        raise CartridgeError(f"{directory} has no {WEIGHTS}", hint="lcc reads safetensors only, never pickled .bin")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CartridgeError(f"{config_path.name} is not valid JSON") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "CARTRIDGE":
        raise CartridgeError(f"{directory} holds a {str(config.get('peft_type') if isinstance(config, dict) else '?')[:20]}"
                             f" adapter, not a PEFT Cartridge")
    def number(key, default):
        value = config.get(key)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CartridgeError(f"{CONFIG}: {key} must be a positive integer")
        return value

    layers = number("num_layers", facts.num_layers)
    heads = number("num_attention_heads", facts.num_kv_heads)
    head_dim = number("token_dim", facts.num_kv_heads * facts.head_dim) // heads
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
    if config.get("num_virtual_tokens") not in (None, embeddings.shape[0]):
        raise CartridgeError("num_virtual_tokens disagrees with the adapter tensor")
    manifest = None
    if (directory / MANIFEST).is_file():
        try:
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            manifest = None
    return unpack(embeddings, layers, heads, head_dim), manifest, hashlib.sha256(data).hexdigest()
