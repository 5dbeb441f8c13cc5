"""``apply_hisa``: switch a loaded Hugging Face model to HISA attention in place."""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.cache_utils import DynamicCache

from . import attention, fused, ops
from .cache import HisaCache
from .config import HisaConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _cache_kwarg(model) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _attention_modules(model):
    """(layer_idx, module) for every self-attention module of the decoder."""
    found = []
    for _, module in model.named_modules():
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            found.append((module.layer_idx, module))
    return found


def apply_hisa(model, config: HisaConfig | None = None):
    """Patch ``model`` (a transformers causal LM of a supported family) so that ``model(...)`` and
    ``model.generate(...)`` run HISA attention with a :class:`HisaCache`. Returns the model.

    Weights, RoPE, norms and MLPs are untouched: only the attention function and the cache change.
    Calling it again replaces the config.
    """
    config = config or HisaConfig()
    if not isinstance(config, HisaConfig):
        raise TypeError(f"config must be a HisaConfig, got {type(config).__name__}")
    model_config = getattr(model, "config", None)
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"HISA does not support model type {model_type!r} ({type(model).__name__}); supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama, Mistral, Qwen2/Qwen2.5, Qwen3 families)"
        )
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention modules in {type(model).__name__}; is this a decoder-only LM?")
    num_layers = getattr(model_config.get_text_config(decoder=True), "num_hidden_layers", len(modules))
    bad = [i for i in config.dense_layers if i >= num_layers]
    if bad:
        raise ValueError(f"dense_layers {bad} out of range: the model has {num_layers} layers")

    attention.register()
    for _, module in modules:
        module.hisa_config = config
    model.hisa_config = config
    for sub in model.modules():  # the top model and its inner base model may each hold a config
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = attention.ATTN_NAME

    if not getattr(model, "_hisa_patched", False):
        _install_cache_hooks(model)
        model._hisa_patched = True
    return model


def new_cache(model, max_cache_len: int | None = None) -> HisaCache:
    """An empty :class:`HisaCache` matching a HISA-patched model."""
    cfg = getattr(model, "hisa_config", None) or HisaConfig()
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    return HisaCache(cfg, max_cache_len=max_cache_len, num_layers=n)


def _install_cache_hooks(model) -> None:
    """Make forward() and generate() create a HisaCache where transformers would create a DynamicCache."""
    cache_name = _cache_kwarg(model)
    original_forward = model.forward

    @functools.wraps(original_forward)
    def forward(*args, **kwargs):
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", True)
        if use_cache and kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs[cache_name] = new_cache(model)
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        n_tokens = inputs.shape[1] if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else 0
        keep = kwargs.get("output_hidden_states")
        if keep is None:
            keep = getattr(model.config, "output_hidden_states", False)
        # long forwards: fused elementwise kernels, residual additions inside the output projections
        with fused.prefill_fusion(model, n_tokens, keep_hidden_states=bool(keep)):
            return original_forward(*args, **kwargs)

    model.forward = forward

    original_prepare = model._prepare_cache_for_generation

    @functools.wraps(original_prepare)
    def prepare(generation_config, model_kwargs, *args, **kwargs):
        result = original_prepare(generation_config, model_kwargs, *args, **kwargs)
        for name in ("cache", "past_key_values"):
            if type(model_kwargs.get(name)) is DynamicCache:  # a default cache, not one the user passed
                model_kwargs[name] = new_cache(model)
        return result

    model._prepare_cache_for_generation = prepare


def warmup(model, max_len: int) -> list[int]:
    """Compile HISA's GPU kernels for a patched ``model`` for every context bucket up to ``max_len``
    (see :func:`hisa.ops.warmup`); a no-op on CPU. Returns the key lengths warmed."""
    cfg = getattr(model, "hisa_config", None)
    if cfg is None:
        raise ValueError("warmup needs a model patched with apply_hisa")
    text = model.config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    param = next(model.parameters())
    return ops.warmup(
        cfg,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        max_len=max_len,
        dtype=param.dtype,
        device=param.device,
    )
