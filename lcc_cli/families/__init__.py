"""Model families: the one place that knows how a kind of model is built.

Everything else asks the loaded model's family (`LoadedModel.family`), never a module name:
where the decoder layers are, where a layer's queries can be read as its attention scores
them (after a query norm where the family has one), how RoPE rotates (`rope_parameters`, read
by buffer.Rope), which projections a LoRA compiler adapts, and how the chat template is
rendered. A family is one module that subclasses `Family` and registers its `model_type`s;
adding one is that file and a test with a tiny random model of it (tests/conftest.py).

A model whose type no module claims is read as the Llama family when it has Llama's shape
(decoder layers with `self_attn.q_proj`), which covers Mistral-like models; anything else is
refused where its queries are first needed.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..errors import ModelMismatchError

# The RoPE fields that decide where a stored key sits.
ROPE_FIELDS = ("rope_type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings", "partial_rotary_factor")


class Family:
    """The Llama way of being built; families that differ override what differs."""

    name = "llama"
    model_types: tuple[str, ...] = ()
    # LoRA targets of a compiler: every attention projection (the paper's choice)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    # keyword arguments every chat-template render gets (Qwen3: answer without thinking)
    template_kwargs: dict = {}

    # --- structure -------------------------------------------------------------------------

    @staticmethod
    def layers(model) -> list:
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise ModelMismatchError(f"{type(model).__name__} has no decoder layers where lcc looks (model.layers)")
        return list(layers)

    def query_module(self, layer):
        """The module whose output is a layer's queries as its attention scores them, before RoPE."""
        attention = getattr(layer, "self_attn", None)
        if attention is None or not hasattr(attention, "q_proj"):
            raise ModelMismatchError("lcc reads a layer's queries from self_attn.q_proj; this model has none",
                                     hint="add a family module for it (lcc_cli/families/)")
        return attention.q_proj

    def attention_scale(self, model) -> float | None:
        """The attention's softmax scale, where the model states one (else head_dim ** -0.5)."""
        return getattr(getattr(self.layers(model)[0], "self_attn", None), "scaling", None)

    @contextmanager
    def capture_queries(self, model):
        """Within the block, every forward pass appends each layer's queries, [batch, tokens,
        heads * head_dim] or [batch, tokens, heads, head_dim], to the yielded list in layer order."""
        captured: list = []
        hooks = [self.query_module(layer).register_forward_hook(lambda module, args, out: captured.append(out))
                 for layer in self.layers(model)]
        try:
            yield captured
        finally:
            for hook in hooks:
                hook.remove()

    # --- positions -------------------------------------------------------------------------

    @staticmethod
    def head_dim(cfg) -> int:
        """Width of one attention head: given by the config, or hidden size over heads."""
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @staticmethod
    def rope_parameters(cfg) -> dict:
        """The RoPE facts that decide where a stored key sits: type, theta, scaling fields."""
        params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        if "rope_theta" not in params and getattr(cfg, "rope_theta", None):
            params["rope_theta"] = cfg.rope_theta
        params.setdefault("rope_type", params.pop("type", None) or "default")
        if getattr(cfg, "partial_rotary_factor", None):
            params["partial_rotary_factor"] = cfg.partial_rotary_factor
        out = {k: params[k] for k in ROPE_FIELDS if params.get(k) is not None}
        if "rope_theta" in out:
            out["rope_theta"] = float(out["rope_theta"])
        return out

    # --- the chat template -----------------------------------------------------------------

    def render(self, tokenizer, messages: list[dict], generation: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                             **self.template_kwargs)


FAMILIES: dict[str, Family] = {}


def register(family: type[Family]) -> type[Family]:
    for model_type in family.model_types:
        FAMILIES[model_type] = family()
    return family


def family_of(config) -> Family:
    """The family of a model config (its `model_type`), or Llama's for an unclaimed type."""
    from . import llama, qwen  # noqa: F401  (each registers itself)

    return FAMILIES.get(getattr(config, "model_type", None), FAMILIES["llama"])
