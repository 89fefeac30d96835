"""What a model folder must be before lcc loads it, and what its weights must be after.

A model folder is untrusted input, so `load_model` (model.py) checks it here before transformers reads it:

- No code from the folder ever runs. A config.json or tokenizer_config.json with an `auto_map`
  is refused, and every `from_pretrained` gets `trust_remote_code=False`, so transformers
  never even asks (it would prompt, and a "y" on stdin would run the folder's Python).
- config.json is read here, once: a regular file (a FIFO blocks, /dev/zero never ends) of at
  most 1 MB, then handed to transformers as a config object, so what was checked is what is
  built. Every other file in the folder must be a regular file too.
- Its sizes are bounded (`_SIZE_LIMITS`) and its parameter count, estimated from the config,
  must fit this machine's memory: a config claiming 10^9 layers would otherwise allocate
  until memory runs out, for minutes, before failing.
- Its RoPE must be one that stored keys can be moved under (buffer.MOVABLE_ROPE). Refused
  here, the user hears why; found later, it looked like a cartridge made for another model.

After loading, the checkpoint's tensors must be exactly the model's: transformers fills a
missing layer with random weights and drops unknown ones, with no error.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import ModelError, ModelMismatchError

CONFIG_MAX_BYTES = 1 << 20  # real config.json files are a few kB
TOKENIZER_CONFIG_MAX_BYTES = 16 << 20  # some carry large added-token tables and chat templates
# Each bound is several times the largest released model's value (in brackets), and far below
# what would exhaust memory just building the model's Python objects.
_SIZE_LIMITS = {
    "num_hidden_layers": 1024,  # [126, Llama 3.1 405B]
    "hidden_size": 65_536,  # [16,384]
    "intermediate_size": 1 << 20,  # [53,248]
    "moe_intermediate_size": 1 << 20,
    "num_attention_heads": 1024,  # [128]
    "num_key_value_heads": 1024,
    "head_dim": 4096,  # [256]
    "vocab_size": 1 << 22,  # [262,144, Gemma 3]
    "max_position_embeddings": 1 << 26,  # [10,485,760, Llama 4 Scout]
    "num_local_experts": 4096,  # [256, DeepSeek-V3]
    "num_experts": 4096,
    "n_routed_experts": 4096,
}
# The same sizes under the names older architectures use (GPT-2, GPT-J, OPT, Falcon...).
_SIZE_ALIASES = {
    "n_layer": "num_hidden_layers", "num_layers": "num_hidden_layers", "n_embd": "hidden_size",
    "d_model": "hidden_size", "n_head": "num_attention_heads", "n_inner": "intermediate_size",
    "ffn_dim": "intermediate_size", "n_positions": "max_position_embeddings", "n_ctx": "max_position_embeddings",
}


def head_dim(cfg) -> int:
    """Width of one attention head (the model family says how to read it)."""
    from ..families import family_of

    return family_of(cfg).head_dim(cfg)


def rope_parameters(cfg) -> dict:
    """The RoPE facts that decide where a stored key sits (the model family says how to read them)."""
    from ..families import family_of

    return family_of(cfg).rope_parameters(cfg)


def read_model_config(path: Path):
    """The folder's config.json, checked (see the module docstring), as a transformers config."""
    _check_regular_files(path)
    data = read_json_file(path / "config.json", CONFIG_MAX_BYTES)
    _refuse_remote_code(data, "config.json")
    if (path / "tokenizer_config.json").exists():
        _refuse_remote_code(read_json_file(path / "tokenizer_config.json", TOKENIZER_CONFIG_MAX_BYTES),
                            "tokenizer_config.json")
    check_config_sizes(data)
    cfg = _build_config(data)
    check_rope(cfg)
    return cfg


def _check_regular_files(path: Path) -> None:
    """transformers opens files by name; a FIFO would block it and a device never end."""
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        try:
            mode = os.stat(entry.path).st_mode  # follows links: HF caches link files to blobs
        except OSError:
            continue  # a dangling link: transformers reports it if it needs the file
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelError(f"{entry.name} is not a regular file (in {path})",
                             hint="a model folder holds plain files; copy the real file in")


def read_json_file(file: Path, limit: int) -> dict:
    """A JSON object from a regular file of at most `limit` bytes, opened without blocking."""
    try:
        # O_NONBLOCK: opening a FIFO swapped in after the folder check must not wait for a writer
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ModelError(f"cannot read {file}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelError(f"{file.name} is not a regular file (in {file.parent})")
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise ModelError(f"{file.name} is larger than {limit >> 20} MB; a real one is a few kB (in {file.parent})")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{file.name} is not valid JSON (in {file.parent})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{file.name} does not hold a JSON object (in {file.parent})")
    return data


def _refuse_remote_code(data: dict, name: str) -> None:
    if data.get("auto_map"):
        raise ModelError(f"{name} names Python code in the model folder (auto_map); lcc never runs a model's code",
                         hint="use a model type built into transformers; if this one is, delete auto_map")


def check_config_sizes(data: dict) -> None:
    """Every size in config.json (and its text_config) a positive integer within _SIZE_LIMITS."""
    sections = [data]
    if isinstance(data.get("text_config"), dict):  # multimodal configs nest the decoder's sizes
        sections.append(data["text_config"])
    for section in sections:
        for key, value in section.items():
            name = _SIZE_ALIASES.get(key, key)
            if name not in _SIZE_LIMITS or value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"bad config.json: {key} must be a positive integer (got {value!r})"[:300])
            if value > _SIZE_LIMITS[name]:
                raise ModelError(f"config.json: {key} = {value} is beyond any real model "
                                 f"(lcc accepts up to {_SIZE_LIMITS[name]:,})"[:300])


def _build_config(data: dict):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelError(f"config.json: unknown model_type {model_type!r}"[:300],
                         hint="lcc loads model types built into transformers only")
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as exc:  # config classes validate with many exception types
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"bad config.json: {message}"[:300]) from exc


def check_rope(cfg) -> None:
    """Refuse at load a RoPE under which stored keys cannot be moved (buffer.Rope)."""
    from ..buffer import MOVABLE_ROPE, Rope

    params = rope_parameters(cfg)
    kind = params.get("rope_type", "default")
    if "rope_theta" not in params:
        raise ModelError("config.json has no rope_theta: lcc needs a model with rotary position embeddings (RoPE)")
    if kind not in MOVABLE_ROPE:
        raise ModelError(f"this RoPE type ({kind}) cannot be moved exactly: its angles are not position x a fixed "
                         "frequency, so lcc cannot place stored keys at new positions",
                         hint=f"lcc supports the RoPE types {', '.join(MOVABLE_ROPE)}")
    try:
        Rope.from_parameters(params, head_dim(cfg))
    except ModelMismatchError as exc:
        raise ModelError(exc.message, hint=exc.hint) from exc
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
        raise ModelError(f"config.json: RoPE parameters lcc cannot use ({params})"[:300],
                         hint="lcc needs a RoPE model with rope_theta and its type's scaling fields") from exc


def estimate_parameters(cfg) -> int:
    """Parameters of a decoder as the config describes it (attention, MLP or experts,
    embeddings). An estimate from below: norms and biases are left out."""
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def size(name: str, default: int = 0) -> int:
        return getattr(cfg, name, None) or default

    hidden, layers, heads = size("hidden_size"), size("num_hidden_layers"), size("num_attention_heads", 1)
    kv_heads, dim = size("num_key_value_heads", heads), size("head_dim", hidden // heads)
    experts = size("num_local_experts") or size("num_experts") or size("n_routed_experts") or 1
    ffn = size("moe_intermediate_size", size("intermediate_size")) * experts if experts > 1 \
        else size("intermediate_size", 4 * hidden)
    per_layer = hidden * dim * (2 * heads + 2 * kv_heads) + 3 * hidden * ffn
    embeddings = size("vocab_size") * hidden * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return layers * per_layer + embeddings


def check_fits_memory(cfg, device: str, dtype) -> None:
    """Refuse a model that cannot fit: it loads into RAM first, then moves to the device."""
    params = estimate_parameters(cfg)
    need = params * dtype.itemsize
    where = [("this machine's memory", _machine_memory())]
    if device.startswith("cuda"):
        where.append((f"{device}'s memory", _cuda_memory(device)))
    for name, have in where:
        if have and need > have:
            raise ModelError(f"config.json describes a model of about {params / 1e9:,.1f} billion parameters, "
                             f"{need / 2**30:,.1f} GiB as {str(dtype).removeprefix('torch.')}; "
                             f"{name} is {have / 2**30:,.1f} GiB")


def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown here: the loader's own out-of-memory error still applies


def _cuda_memory(device: str) -> int:
    import torch

    index = torch.device(device).index
    return torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).total_memory


def check_weights_match(net, loading: dict, path: Path) -> None:
    """The checkpoint's tensors must be exactly the model's: transformers would fill a missing
    one with random values and drop an unknown one, silently."""
    exempt = _not_in_checkpoints(net)
    problems = []
    for label, keys in (("missing", loading.get("missing_keys")), ("unexpected", loading.get("unexpected_keys")),
                        ("of the wrong shape", loading.get("mismatched_keys"))):
        names = sorted({key[0] if isinstance(key, tuple) else key for key in keys or ()} - exempt)
        names = [name for name in names if not name.endswith(".inv_freq")]  # old checkpoints stored it
        if names:
            problems.append(f"{len(names)} {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    if problems:
        raise ModelError(f"the weights in {path} do not match its config.json: tensors " + "; ".join(problems),
                         hint="the checkpoint is incomplete or made for another configuration")


def _not_in_checkpoints(net) -> set[str]:
    """Names a checkpoint need not hold: buffers rebuilt from the config (rotary inv_freq), and
    a tied lm_head, which is the input embedding."""
    persistent = set(net.state_dict())
    names = {name for name, _ in net.named_buffers() if name not in persistent}
    if getattr(net.config, "tie_word_embeddings", False):
        names.add("lm_head.weight")
    return names


