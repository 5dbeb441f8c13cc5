"""Decode steps without per-step host overhead: the model's one-token forward recorded in a CUDA graph.

At batch 1 a transformers decoder spends far longer launching its few hundred small kernels from Python
than the GPU spends running them. ``DecodeStep`` records the forward of one token over a preallocated
:class:`~hisa.cache.HisaCache` once, and replays it for every following token::

    step = DecodeStep(model)              # a model patched with apply_hisa
    cache = new_cache(model, max_cache_len=n_prompt + n_new)
    logits = model(prompt, cache=cache).logits[:, -1]       # prefill as usual
    for _ in range(n_new):
        token = logits.argmax(-1)
        logits = step(token, cache)       # [B, vocab]; valid until the next call
    step.forget(cache)                    # drop the graphs recorded over this cache

What makes the forward recordable: while recording, the cache's layers append the new token at a position
read from device memory (``HisaLayer.static_len``) and hand attention their full-capacity buffers;
attention then runs :func:`hisa.ops.decode_static`, whose kernels read the key length from the same device
tensor. Nothing in the step depends on the length on the host, so one graph serves every step until the
cache's capacity is reached. The graphs are kept on the cache (``cache.decode_graphs``) and die with it.
``DecodeStep.chunk`` does the same for a few new tokens at once (a follow-up question after a cached
document), in fixed-size recorded steps. Dense and sparse attention are separate graphs: a step records the sparse one
when the context crosses :func:`hisa.attention.sparse_for`'s threshold.

Without CUDA graphs (CPU, no Triton kernels, ``graphs=False``, or a recording that failed) the step runs
the model's forward eagerly: same results, same call for the caller.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass

import torch

from . import attention
from .cache import HisaCache
from .config import HisaConfig
from .fused import fused_elementwise
from .patch import _cache_kwarg

log = logging.getLogger("hisa.graph")


CHUNK = 16  # tokens per recorded chunk step (DecodeStep.chunk): a follow-up question's new tokens


@dataclass
class _Recorded:
    key: tuple
    graph: object  # torch.cuda.CUDAGraph
    ids: torch.Tensor  # [B, T] static input token ids
    pos: torch.Tensor  # [B, T] static position ids
    length: torch.Tensor  # [2] int32: [key length after the step, position of the first new token]
    select: torch.Tensor  # [1] int64: which of the T positions' logits to return (the last real token)
    logits: torch.Tensor  # [B, vocab] static output


class DecodeStep:
    """Decode steps of a HISA-patched ``model`` from CUDA graphs; see the module docstring.

    ``step(token, cache)`` feeds one token per sequence; ``step.chunk(ids, cache)`` feeds a few tokens (up
    to ``CHUNK`` per recorded step, e.g. a follow-up question after a cached document), both returning the
    next-token logits [B, vocab] (valid until the next call).

    ``graphs``: record and replay CUDA graphs (default: on CUDA when HISA's Triton kernels are
    available). ``static``: without graphs, still run the graph's code path eagerly (full-capacity
    buffers, device-side positions); used by tests to check that path on the CPU. ``fuse``: record the
    RMSNorm / rotary / SiLU-gate code compiled into one kernel each (:mod:`hisa.fused`);
    ``join_projections``: and the q/k/v and gate/up projections as one matrix product each (the model's
    parameters become views of the stacked weights; values unchanged).
    """

    def __init__(self, model, *, graphs: bool | None = None, static: bool = False, fuse: bool = True,
                 join_projections: bool = True):
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        if graphs is None:
            from . import ops  # noqa: PLC0415

            graphs = self.device.type == "cuda" and ops.backend_for(param.new_empty(1, 1, 1, 1)) == "triton"
        self.graphs = bool(graphs) and self.device.type == "cuda"
        self.static = static or self.graphs
        self.fuse = fuse and self.graphs  # compiled elementwise code inside recordings (hisa.fused)
        # ... and joined q/k/v and gate/up projections (their parameters become views of stacked weights)
        self.join_projections = self.fuse and join_projections
        self._cache_kw = _cache_kwarg(model)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        text = model.config.get_text_config(decoder=True)
        self.num_layers = text.num_hidden_layers
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        self._probes = {t: param.new_empty(1, heads, t, head_dim) for t in (1, CHUNK)}
        # the static path knows plain causal attention only: a model with an active sliding window decodes eagerly
        window = getattr(text, "sliding_window", None)
        self._causal_only = not window or getattr(text, "use_sliding_window", True) is False
        self._warm: set = set()
        self._stream = None
        self._arange = torch.arange(CHUNK, device=self.device)
        self.replays = 0  # steps replayed from a CUDA graph
        self.static_steps = 0  # steps that ran the static path eagerly (graphs=False, static=True)
        self.recordings = 0
        self.failed: str | None = None  # why graphs were turned off, if they were

    # -- the model's forward ---------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, cache, position_ids: torch.Tensor | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, vocab] of the last position of ``ids`` [B, L] run over ``cache`` (or of position
        ``select`` [1], a device tensor)."""
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        keep = ids.shape[1] if select is not None else 1
        if self._logits_to_keep:
            logits = self.model(input_ids=ids, logits_to_keep=keep, **kwargs).logits
        else:
            hidden = self.model.get_decoder()(input_ids=ids, **kwargs).last_hidden_state
            logits = self.model.lm_head(hidden[:, -keep:])
        if select is None:
            return logits[:, -1]
        return logits.index_select(1, select)[:, 0]

    # -- public API --------------------------------------------------------------------------------------
    def __call__(self, token: torch.Tensor, cache) -> torch.Tensor:
        """Logits [B, vocab] after feeding ``token`` (one id per sequence, on the model's device) to the
        model over ``cache``, which advances by one position."""
        return self._step(token.reshape(-1, 1), cache, 1)

    def chunk(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Logits [B, vocab] after feeding ``ids`` [B, L] (a few tokens after cached ones: a follow-up
        question) to the model over ``cache``. Runs in steps of up to ``CHUNK`` tokens, each replayed from a
        graph recorded once per cache (shorter steps are padded: the padding is written past the cache's
        length, where the next tokens overwrite it). Attention over the new tokens is dense, as the eager
        path computes it for so few queries below its decode crossover; elsewhere the eager forward runs."""
        if ids.dim() == 1:
            ids = ids.view(1, -1)
        logits = None
        for s0 in range(0, ids.shape[1], CHUNK):
            logits = self._step(ids[:, s0 : s0 + CHUNK], cache, CHUNK)
        return logits

    def prepare_chunk(self, cache) -> bool:
        """Record the chunk step over ``cache`` ahead of time (e.g. while a server is idle, for the follow-up
        question a cached document is likely to get), so that the next ``chunk()`` only replays. Runs
        nothing that changes the cache's contents. Returns whether a recorded chunk step is ready."""
        if not self.graphs or not isinstance(cache, HisaCache) or not cache.layers:
            return False
        n = cache.get_seq_length()
        first = cache.layers[0]
        if not first.is_initialized:
            return False
        ids = torch.zeros(first._k.shape[0], 0, dtype=torch.long, device=self.device)
        plan = self._plan(cache, ids.shape[0], n, CHUNK, CHUNK)
        if plan is None:
            return False
        flags, key = plan
        rec = cache.decode_graphs.get(CHUNK)
        if rec is not None and rec.key == key:
            return True
        try:
            cache.decode_graphs[CHUNK] = self._record(ids, cache, n, CHUNK, flags, key)
        except Exception as e:  # noqa: BLE001 - the chunk will run eagerly (or record) when it comes
            self._disarm(cache)
            log.warning("could not record a chunk step ahead of time: %s: %s", type(e).__name__, e)
            return False
        return True

    @staticmethod
    def forget(cache) -> None:
        """Drop the graphs recorded over ``cache`` (their memory pools are freed). ``HisaCache.release()``
        drops them too."""
        if getattr(cache, "decode_graphs", None):
            cache.decode_graphs.clear()

    # -- internals -----------------------------------------------------------------------------------
    def _step(self, ids: torch.Tensor, cache, width: int) -> torch.Tensor:
        """Feed ``ids`` [B, t] (t <= width) through the static path recorded for ``width`` tokens."""
        n = cache.get_seq_length()
        t = ids.shape[1]
        plan = self._plan(cache, ids.shape[0], n, t, width) if self.static else None
        if plan is None:
            return self.forward(ids, cache)
        flags, key = plan
        if not self.graphs:
            return self._static_eager(ids, cache, n, width, flags)
        graphs = cache.decode_graphs
        rec = graphs.get(width)
        if rec is None or rec.key != key:
            graphs.pop(width, None)
            try:
                rec = self._record(ids, cache, n, width, flags, key)
            except Exception as e:  # noqa: BLE001 - a model we cannot record still decodes, eagerly
                self._disarm(cache)
                if isinstance(e, torch.OutOfMemoryError):
                    raise  # the caller's problem (free memory, fail this request), not a reason to stop recording
                if self.fuse:  # try again without the compiled elementwise code
                    log.warning("recording the decode step with fused elementwise code failed (%s: %s); "
                                "recording without it", type(e).__name__, e)
                    self.fuse = False
                    return self._step(ids, cache, width)
                self._disable(f"{type(e).__name__}: {e}")
                return self.forward(ids, cache)
            graphs[width] = rec
        self._set_inputs(rec, ids, n, width)
        rec.graph.replay()
        self.replays += 1
        self._advance(cache, n, t, flags)
        return rec.logits

    def _set_inputs(self, rec: _Recorded, ids, n: int, width: int) -> None:
        t = ids.shape[1]
        rec.ids[:, :t].copy_(ids)
        if width == 1:
            rec.pos.fill_(n)
        else:
            torch.add(self._arange[:width], n, out=rec.pos[0])
            if rec.pos.shape[0] > 1:
                rec.pos[1:].copy_(rec.pos[:1].expand(rec.pos.shape[0] - 1, -1))
        rec.length[0].fill_(n + t)
        rec.length[1].fill_(n)
        if width > 1:  # a one-token step returns its only position
            rec.select.fill_(max(t - 1, 0))

    def _disable(self, why: str) -> None:
        log.warning("CUDA-graph decode turned off, decoding eagerly from now on: %s", why)
        self.failed = why
        self.graphs = self.static = False

    def _plan(self, cache, batch: int, n: int, t: int, width: int):
        """(per-layer sparse flags, graph key) when this step can take the static path, else None."""
        if (not self._causal_only or not isinstance(cache, HisaCache) or n == 0 or t == 0
                or len(cache.layers) != self.num_layers):
            return None
        layers = cache.layers
        first = layers[0]
        if any(not layer.is_initialized for layer in layers) or first._k.shape[0] != batch:
            return None
        if any(layer.length != n or layer.capacity < n + width for layer in layers):
            return None  # ragged layers or a full cache: the eager step (which grows the buffers) runs
        cfg = attention.effective_config(getattr(self.model, "hisa_config", None) or HisaConfig())
        if width == 1:
            # one decision for the step (for no layer in particular), then the configured dense layers
            sparse = attention.sparse_for(cfg, None, self._probes[1], n + 1, static=True)
            flags = tuple(sparse and i not in cfg.dense_layers for i in range(self.num_layers))
            if self.graphs and any(flags) and first._pooled.shape[2] > _max_static_blocks():
                return None
        else:
            # chunks are recorded with dense attention only: where the eager path would attend sparsely to
            # these few queries (past its decode crossover), let it
            if attention.sparse_for(cfg, None, self._probes[CHUNK], n + width):
                return None
            flags = (False,) * self.num_layers
        key = (flags, cfg, batch, first.capacity, first._k.data_ptr())
        return flags, key

    def _arm(self, cache, length: torch.Tensor, flags) -> None:
        for layer, sparse in zip(cache.layers, flags):
            layer.static_len = length
            layer.static_sparse = sparse

    @staticmethod
    def _disarm(cache) -> None:
        for layer in cache.layers:
            layer.static_len = None
            layer.static_sparse = False

    def _advance(self, cache, n: int, t: int, flags) -> None:
        for layer in cache.layers:
            layer.length = n + t
        if attention._stats.get() is not None:
            cfg = attention.effective_config(getattr(self.model, "hisa_config", None) or HisaConfig())
            batch = cache.layers[0]._k.shape[0]
            for i, sparse in enumerate(flags):
                attention.count(i, batch, t, n + t, cfg.top_k if sparse else None)

    def _fusions(self):
        if not self.fuse:
            return contextlib.nullcontext()
        return fused_elementwise(self.model, "compiled", join_projections=self.join_projections)

    def _new_inputs(self, ids, n: int, width: int) -> _Recorded:
        B, t = ids.shape
        rec_ids = torch.zeros(B, width, dtype=ids.dtype, device=self.device)
        rec = _Recorded(key=None, graph=None, ids=rec_ids, pos=torch.zeros_like(rec_ids),
                        length=torch.zeros(2, dtype=torch.int32, device=self.device),
                        select=torch.zeros(1, dtype=torch.long, device=self.device), logits=None)
        self._set_inputs(rec, ids, n, width)
        return rec

    def _static_eager(self, ids, cache, n: int, width: int, flags) -> torch.Tensor:
        rec = self._new_inputs(ids, n, width)
        self._arm(cache, rec.length, flags)
        try:
            with attention.untracked():
                logits = self.forward(rec.ids, cache, rec.pos, rec.select if width > 1 else None)
        finally:
            self._disarm(cache)
        self._advance(cache, n, ids.shape[1], flags)
        self.static_steps += 1
        return logits

    def _record(self, ids, cache, n: int, width: int, flags, key) -> _Recorded:
        rec = self._new_inputs(ids, n, width)
        rec.key = key
        select = rec.select if width > 1 else None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        # the first recording of each kernel variant runs the step once first (Triton compiles, cuBLAS
        # initialises on this stream); every write of the step is idempotent, so running it twice is harmless
        warm_key = (flags, key[1], ids.shape[0], width, _bucket(cache.layers[0].capacity))
        self._arm(cache, rec.length, flags)
        try:
            with attention.untracked(), torch.cuda.stream(stream), self._fusions():
                if warm_key not in self._warm:
                    self.forward(rec.ids, cache, rec.pos, select)
                    stream.synchronize()
                    self._warm.add(warm_key)
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    rec.logits = self.forward(rec.ids, cache, rec.pos, select)
                finally:
                    graph.capture_end()
        finally:
            self._disarm(cache)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        rec.graph = graph
        self.recordings += 1
        return rec


def _bucket(capacity: int) -> int:
    return 1 << max(0, capacity - 1).bit_length()


def _max_static_blocks() -> int:
    from .kernels.select import MAX_SELECT_WIDTH  # noqa: PLC0415

    return MAX_SELECT_WIDTH
