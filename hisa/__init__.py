"""HISA — Hierarchical Indexed Sparse Attention for Hugging Face causal LMs.

    from hisa import HisaConfig, apply_hisa
    model = apply_hisa(model, HisaConfig(top_k=2048))
"""

from .attention import AttentionStats, override, track
from .cache import HisaCache, HisaLayer
from .config import HisaConfig
from .graph import DecodeStep
from .patch import SUPPORTED_MODEL_TYPES, apply_hisa, new_cache, warmup
from .reference import dense_attention_reference, hisa_attention_reference, pool_keys

__all__ = [
    "AttentionStats",
    "DecodeStep",
    "HisaCache",
    "HisaConfig",
    "HisaLayer",
    "SUPPORTED_MODEL_TYPES",
    "apply_hisa",
    "dense_attention_reference",
    "hisa_attention_reference",
    "new_cache",
    "override",
    "pool_keys",
    "track",
    "warmup",
]
__version__ = "0.1.0"
