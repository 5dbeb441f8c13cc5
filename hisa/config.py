"""HisaConfig: the knobs of Hierarchical Indexed Sparse Attention."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SELECTION_MODES = ("group", "head")


@dataclass(frozen=True)
class HisaConfig:
    """Settings of HISA attention.

    block_size:  tokens per block; each block keeps the mean of its post-RoPE keys.
    top_blocks:  blocks kept per query by stage 1 (the first block and the query's own block
                 are always among them).
    top_k:       tokens kept per query by stage 2, chosen inside the kept blocks.
    dense_layers: indices of decoder layers that keep plain dense attention.
    min_context: a forward whose key length is below this runs dense attention (a speed choice:
                 below it sparse selection does not pay off). 0 means HISA always.
    selection:   "group" — the query heads of one KV-head group share one selection (scores
                 summed over the group's heads); "head" — every query head selects on its own.
    enabled:     False turns HISA off (dense attention everywhere) without unpatching the model.

    Defaults were chosen by measurement with ``bench/quality.py``; see docs/quality.md.
    """

    block_size: int = 64
    top_blocks: int = 64
    top_k: int = 2048
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    min_context: int = 4096
    selection: str = "group"
    enabled: bool = True

    def __post_init__(self) -> None:
        # accept lists/sets for dense_layers, store an immutable sorted tuple
        try:
            layers = tuple(sorted({int(i) for i in self.dense_layers}))
        except TypeError as e:  # e.g. an int instead of a list
            raise ValueError(f"dense_layers must be a sequence of layer indices, got {self.dense_layers!r}") from e
        object.__setattr__(self, "dense_layers", layers)
        for name in ("block_size", "top_blocks", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.min_context, bool) or not isinstance(self.min_context, int) or self.min_context < 0:
            raise ValueError(f"min_context must be an integer >= 0, got {self.min_context!r}")
        if any(i < 0 for i in layers):
            raise ValueError(f"dense_layers must be non-negative layer indices, got {layers}")
        if self.top_blocks * self.block_size < self.top_k:
            raise ValueError(
                f"top_blocks * block_size ({self.top_blocks} * {self.block_size} = "
                f"{self.top_blocks * self.block_size}) must be >= top_k ({self.top_k}): stage 2 picks top_k "
                "tokens from the kept blocks, so the blocks must hold at least that many"
            )
        if self.top_blocks < 2:
            raise ValueError("top_blocks must be >= 2 (the sink block and the query's own block are always kept)")
        if self.selection not in SELECTION_MODES:
            raise ValueError(f"selection must be one of {SELECTION_MODES}, got {self.selection!r}")

    def replace(self, **changes) -> "HisaConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        return d
