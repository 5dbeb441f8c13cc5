"""Position-by-position comparison of a dense and a sparse (HISA) run of the same model on the same
tokens: perplexity of both, next-token KL(dense || sparse) and top-1 agreement.

Logits are never materialised for a whole window: final hidden states are projected through the output
head ``chunk`` positions at a time and only running sums are kept, so memory stays O(chunk x vocab).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def compare_logits(dense_logits: torch.Tensor, sparse_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-position metrics for logits [N, V] predicting ``targets`` [N] (float32 maths).

    Returns tensors of shape [N]: ``nll_dense``, ``nll_sparse`` (negative log-likelihood of the target),
    ``kl`` (KL(dense || sparse) of the next-token distributions, in nats) and ``agree`` (True where both
    argmax tokens are the same).
    """
    if dense_logits.shape != sparse_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(dense_logits.shape)} vs {tuple(sparse_logits.shape)}")
    ld = F.log_softmax(dense_logits.float(), dim=-1)
    ls = F.log_softmax(sparse_logits.float(), dim=-1)
    t = targets.to(ld.device).long()[:, None]
    kl = (ld.exp() * (ld - ls)).sum(dim=-1).clamp_min(0.0)  # clamp float noise below zero
    return {
        "nll_dense": -ld.gather(1, t)[:, 0],
        "nll_sparse": -ls.gather(1, t)[:, 0],
        "kl": kl,
        "agree": ld.argmax(dim=-1) == ls.argmax(dim=-1),
    }


@dataclass
class _Sums:
    n: int = 0
    nll_dense: float = 0.0
    nll_sparse: float = 0.0
    kl: float = 0.0
    kl_max: float = 0.0
    agree: int = 0

    def add(self, m: dict, sel: torch.Tensor | None) -> None:
        if sel is not None:
            m = {k: v[sel] for k, v in m.items()}
        n = int(m["kl"].numel())
        if not n:
            return
        self.n += n
        self.nll_dense += float(m["nll_dense"].double().sum())
        self.nll_sparse += float(m["nll_sparse"].double().sum())
        self.kl += float(m["kl"].double().sum())
        self.kl_max = max(self.kl_max, float(m["kl"].max()))
        self.agree += int(m["agree"].sum())

    def result(self) -> dict:
        if not self.n:
            return {"positions": 0, "ppl_dense": None, "ppl_hisa": None, "ppl_delta_pct": None,
                    "kl_mean": None, "kl_max": None, "top1_agreement": None}
        ppl_d = math.exp(self.nll_dense / self.n)
        ppl_s = math.exp(self.nll_sparse / self.n)
        return {
            "positions": self.n,
            "ppl_dense": ppl_d,
            "ppl_hisa": ppl_s,
            "ppl_delta_pct": 100.0 * (ppl_s / ppl_d - 1.0),
            "kl_mean": self.kl / self.n,
            "kl_max": self.kl_max,
            "top1_agreement": self.agree / self.n,
        }


class MetricAccumulator:
    """Running sums over many positions, split into ``all`` positions and the ``sparse`` ones (where
    HISA could differ from dense: the query sees more than ``top_k`` keys). Positions whose context is
    ``<= top_k`` are dense by construction, so they dilute the ``all`` numbers; read ``sparse`` for the
    quality of the approximation itself."""

    def __init__(self) -> None:
        self._all = _Sums()
        self._sparse = _Sums()

    def update(self, dense_logits, sparse_logits, targets, sparse_mask: torch.Tensor) -> None:
        m = compare_logits(dense_logits, sparse_logits, targets)
        self._all.add(m, None)
        self._sparse.add(m, sparse_mask.to(m["kl"].device))

    def merge(self, other: "MetricAccumulator") -> None:
        for mine, theirs in ((self._all, other._all), (self._sparse, other._sparse)):
            mine.n += theirs.n
            mine.nll_dense += theirs.nll_dense
            mine.nll_sparse += theirs.nll_sparse
            mine.kl += theirs.kl
            mine.kl_max = max(mine.kl_max, theirs.kl_max)
            mine.agree += theirs.agree

    def result(self) -> dict:
        return {"all": self._all.result(), "sparse": self._sparse.result()}


def sparse_positions(length: int, top_k: int, active: bool = True) -> torch.Tensor:
    """Bool [length - 1]: which next-token predictions of a window can differ from dense. The
    prediction at index i is made by the query at position i, which sees i + 1 keys."""
    ctx = torch.arange(1, length)
    return (ctx > top_k) & active


@torch.inference_mode()
def compare_hidden(
    dense_hidden: torch.Tensor,
    sparse_hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    sparse_mask: torch.Tensor,
    acc: MetricAccumulator,
    chunk: int = 512,
) -> MetricAccumulator:
    """Project final hidden states [N, H] of both runs through the output ``head`` ``chunk`` rows at a
    time and add the comparison to ``acc``. ``targets`` [N] are the next tokens."""
    n = targets.shape[0]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        acc.update(head(dense_hidden[s:e]), head(sparse_hidden[s:e]), targets[s:e], sparse_mask[s:e])
    return acc
