"""Does a cartridge fit a model? The facts a model must match, and the one fingerprint check.

`ModelFacts` is what a loaded model reports about itself (runtime/model.py fills it in) and
what a manifest records. Shape, RoPE and the position window must match even with --force,
because without them the answer is fluent nonsense; the fingerprint (the model's identity)
decides compatibility, and --force may override it. The float dtype never decides anything:
the reader converts the buffer to the model's dtype on load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ModelMismatchError


@dataclass(frozen=True)
class ModelFacts:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rope: dict  # rope_type, rope_theta and the scaling fields of that type
    max_positions: int | None
    dtype: str  # compute dtype, informational

    def to_manifest(self, model_id: str, fingerprint: str) -> dict:
        return {"id": model_id, "fingerprint": fingerprint, **asdict(self)}


def check_compatible(model: dict, facts: ModelFacts, first_query_position: int, name: str = "cartridge") -> str:
    """Shapes, RoPE and window of a manifest's `model` entry against a model's facts."""
    for key in ("num_layers", "num_kv_heads", "head_dim"):
        if model[key] != getattr(facts, key):
            raise ModelMismatchError(f"{name}: {key} is {model[key]}, the model's is {getattr(facts, key)}")
    want, have = model.get("rope") or {}, facts.rope
    for key in sorted(set(want) | set(have)):
        if _norm(want.get(key)) != _norm(have.get(key)):
            raise ModelMismatchError(f"{name}: RoPE {key} is {want.get(key)!r}, the model's is {have.get(key)!r}")
    limit = facts.max_positions
    if limit and first_query_position >= limit:
        raise ModelMismatchError(f"{name}: its buffer ends at position {first_query_position}, past the model's "
                                 f"{limit}-position window")
    return (f"layers {facts.num_layers}, kv heads {facts.num_kv_heads}, head dim {facts.head_dim}, "
            f"rope {have.get('rope_type')} theta {have.get('rope_theta'):g}")


def _norm(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def check_fingerprint(model: dict, model_id: str, fingerprint: str, name: str = "cartridge",
                      force: bool = False, hint: str = "pass --force to use it anyway") -> str:
    """Refuse a file made for another model (unless forced)."""
    want = model["fingerprint"]
    if want != fingerprint and not force:
        raise ModelMismatchError(f"{name} was made for model {model['id'][:60]} ({str(want)[:12]}), "
                                 f"not {model_id} ({fingerprint[:12]})", hint=hint)
    return str(want)[:16]
