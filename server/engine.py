"""The generation engine: one worker thread owns the model (torch is not re-entrant) and runs every
forward pass; HTTP handlers submit requests and read events from an asyncio queue.

Scheduling: requests wait in a bounded FIFO queue and are admitted in arrival order while the KV budget
allows; admitted sequences advance in round-robin, one step each (a prefill chunk or a decode token), so
a long prefill never starves the others for more than one chunk. Each sequence owns a ``HisaCache``;
finished caches go to the prefix cache (:mod:`server.prefix_cache`) for reuse by follow-up prompts.

The seam for a CUDA-graph decode step is :meth:`Engine.decode_step` (one token over one cache); caches
are created with ``hisa.new_cache(model, max_cache_len=...)`` i.e. preallocated.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

import hisa
from hisa.models import load_model, resolve_model

from .detok import TextStream
from .errors import APIError
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .sampling import PendingSample, Sample, SamplerState, SamplingParams
from .tokcache import PrefixTokenizer

log = logging.getLogger("hisa.server")

# a sparse warm-up prefill this long passes the kernels' dense crossovers (hisa.ops: 12288 / 16384 keys)
WARMUP_SPARSE_TOKENS = 16384 + 256

# generated tokens preallocated (and counted against the KV budget) per sequence up front
GROWTH_RESERVE = 2048
# HISA's min_context where sparse attention has no fast kernels (CPU): dense attention everywhere by default
CPU_MIN_CONTEXT = 1 << 30


# cache room past a sequence's reserve: the follow-up step recorded while idle (``_prepare_followup``) starts
# at the cache's length after the answer (plus the lookahead's token); without it a short answer could leave
# too little room to record it ahead of time, and the follow-up would record it while the client waits
FOLLOWUP_ROOM = hisa.graph.CHUNK + 1
GRAPH_CHUNK_MAX = 64  # prompt tokens after a cached prefix that run as recorded CUDA-graph steps
GRAPH_HOLDERS = 8  # finished requests' caches (prefix cache) that keep their recorded graphs


class _Cancelled(Exception):
    """Raised inside a forward pass to abandon a prefill chunk of a cancelled request."""


# ----------------------------------------------------------------------------------------------------------
# configuration and events
@dataclass
class EngineConfig:
    model: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str | None = None
    max_model_len: int | None = None
    hisa_block_size: int | None = None
    hisa_top_blocks: int | None = None
    hisa_top_k: int | None = None
    hisa_min_context: int | None = None
    no_hisa: bool = False
    max_queue: int = 64
    max_num_seqs: int = 8
    prefill_chunk: int | None = None  # None: 2048 on CPU, 8192 on CUDA
    prefix_cache_tokens: int | None = None  # None: automatic
    chat_template: str | None = None
    gpu_memory_utilization: float = 0.90
    cuda_graphs: bool = True  # decode steps replayed from CUDA graphs on the GPU (--enforce-eager: off)
    lookahead: bool | None = None  # enqueue decode step n+1 before reading token n (None: on CUDA)


@dataclass
class Progress:
    index: int
    processed: int
    total: int
    cached: int


@dataclass
class Delta:
    index: int
    text: str
    token: int | None = None
    sample: Sample | None = None
    finish_reason: str | None = None


@dataclass
class Done:
    usage: dict


@dataclass
class Failed:
    error: APIError


@dataclass
class Job:
    prompt_ids: list[int]
    index: int


class GenRequest:
    """One API request: one or more jobs (prompts x n), run one after the other so that choices of the
    same prompt reuse its prefilled cache."""

    _ids = itertools.count()

    def __init__(self, jobs: list[Job], params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 hisa_overrides: dict | None = None, request_id: str | None = None):
        self.id = request_id or f"req-{next(self._ids)}"
        self.jobs = collections.deque(jobs)
        self.params = params
        self.overrides = hisa_overrides or {}
        self.cache_tag = tuple(sorted(self.overrides.items())) or None  # prefix reuse only between equal settings
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.arrival = time.monotonic()
        self.received = self.arrival  # set by the HTTP handler to when it started (before parsing, tokenizing)
        self.started: float | None = None
        self.first_token: float | None = None
        self.generator = None
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "attended": 0,
                      "visible": 0, "layers": 0}
        self._seen_prompts: set = set()
        self.finished = False

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass


class Sequence:
    """The running state of one job."""

    def __init__(self, req: GenRequest, job: Job, engine: "Engine"):
        self.req = req
        self.job = job
        self.prompt = ids_tensor(job.prompt_ids)
        self.prompt_len = len(job.prompt_ids)
        self.cache = None
        self.pos = 0  # prompt tokens already in the cache
        self.cached = 0  # of which reused from the prefix cache
        self.generated: list[int] = []
        self.last: torch.Tensor | None = None  # last sampled token, on the device
        self.pending = None  # PendingSample of ``last`` not yet read on the host (engine lookahead)
        self.text = TextStream(engine.tokenizer, req.params.stop)
        self.sampler: SamplerState | None = None
        self.attended = 0
        self.visible = 0
        self.layers = 0
        self.t_start = time.monotonic()
        self.t_last: float | None = None
        self.max_tokens = min(req.params.max_tokens, engine.max_model_len - self.prompt_len)

    @property
    def reserve(self) -> int:
        """Tokens this sequence is expected to hold: the prompt plus up to ``GROWTH_RESERVE`` generated
        tokens (caches grow past it when a long answer needs it)."""
        return self.prompt_len + min(self.max_tokens, GROWTH_RESERVE)


def ids_tensor(ids: list[int]) -> torch.Tensor:
    """A CPU int64 tensor of a list of token ids (through numpy: 32k ids in ~0.4 ms, torch.tensor takes ~2-4)."""
    return torch.from_numpy(np.fromiter(ids, dtype=np.int64, count=len(ids)))


# ----------------------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, config: EngineConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics
        self.model = None
        self.tokenizer = None
        self.prompt_tokenizer: PrefixTokenizer | None = None  # reuses ids of recent long texts (follow-ups)
        self.device = None
        self._trim_pending = False  # requests ended since the engine was last idle
        self._prepare = None  # (cache, HISA settings) of the last finished request: record its chunk step when idle
        self._graph_holders: collections.deque = collections.deque()  # cached prefixes that keep CUDA graphs
        self.dtype = None
        self.max_model_len = 0
        self.kv_budget_tokens = 0
        self.prefill_chunk = 0
        self.prefix_cache: PrefixCache | None = None
        self.hisa_config = None
        self.eos_ids: set[int] = set()
        self.generation_defaults: dict = {}
        self.chat_template = None
        self.model_path = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.on_load_failed = None  # callable set by the app (stops the server)
        self._cv = threading.Condition()
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._active: list[Sequence] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="hisa-engine", daemon=True)
        self._prefilling: Sequence | None = None
        self.load_seconds = None
        # tests only: a file whose existence makes the next forward raise (see _injected_fault)
        self._fault_file = os.environ.get("HISA_TEST_FAULT_FILE") or None

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            for req in self._waiting:
                req.emit(Failed(APIError("the server is shutting down", status=503)))
            self._waiting.clear()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def loading(self) -> bool:
        return not self.ready.is_set()

    def _load(self) -> None:
        cfg = self.config
        t0 = time.monotonic()
        delay = float(os.environ.get("HISA_DEBUG_LOAD_DELAY") or 0)  # tests: observe the loading state
        if delay > 0:
            time.sleep(delay)
        where, _ = resolve_model(cfg.model)
        self.model_path = where
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        log.info("loading model %s (%s) on %s, dtype %s", cfg.model or "embedded default", where, device, cfg.dtype)
        model, tok = load_model(cfg.model, dtype=None if cfg.dtype == "auto" else cfg.dtype, device=device)
        changes = {}
        for name in ("block_size", "top_blocks", "top_k", "min_context"):
            value = getattr(cfg, f"hisa_{name}")
            if value is not None:
                changes[name] = value
        if "top_k" in changes and "top_blocks" not in changes:
            bs = changes.get("block_size", hisa.HisaConfig.block_size)
            changes["top_blocks"] = max(hisa.HisaConfig.top_blocks, -(-changes["top_k"] // bs))
        if cfg.no_hisa:
            changes["enabled"] = False
        self.slow_sparse_path = not self._fast_sparse_path(model)
        if self.slow_sparse_path and cfg.hisa_min_context is None and not cfg.no_hisa:
            # without the GPU kernels HISA runs its pure-PyTorch reference, which is slower than dense
            # attention at every length: serve dense unless the user asks for sparse explicitly
            changes["min_context"] = CPU_MIN_CONTEXT
            log.warning("HISA has no fast kernels on %s (pure-PyTorch reference, slower than dense attention): "
                        "attention runs dense here; pass --hisa-min-context N to use sparse attention from N keys",
                        self._device_name(model))
        hcfg = hisa.HisaConfig().replace(**changes)
        hisa.apply_hisa(model, hcfg)
        self.hisa_config = hcfg
        # decode steps replayed from CUDA graphs where the kernels allow it (eager elsewhere)
        self.stepper = hisa.DecodeStep(model, graphs=None if cfg.cuda_graphs else False)
        for layer in getattr(model.get_decoder(), "layers", None) or []:
            layer.register_forward_pre_hook(self._cancel_hook)
        self.model, self.tokenizer = model, tok
        self.prompt_tokenizer = PrefixTokenizer(tok)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # lookahead pays where the device runs asynchronously from the host; on a CPU it would only add a
        # wasted step at the end of each answer
        self.lookahead = self.device.type == "cuda" if cfg.lookahead is None else bool(cfg.lookahead)
        text_cfg = model.config.get_text_config(decoder=True)
        self.vocab_size = int(getattr(text_cfg, "vocab_size", None) or len(tok))
        # end of sequence ids: generation config + tokenizer
        eos = []
        gen = getattr(model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), getattr(text_cfg, "eos_token_id", None), tok.eos_token_id):
            if source is None:
                continue
            eos += list(source) if isinstance(source, (list, tuple)) else [source]
        self.eos_ids = {int(e) for e in eos}
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(gen, name, None) if gen is not None and getattr(gen, "do_sample", True) else None
            if value is not None and not (name == "top_k" and value == 50 and getattr(gen, "_from_model_config", False)):
                self.generation_defaults[name] = value
        # chat template
        if cfg.chat_template:
            self.chat_template = _read_template(cfg.chat_template)
        elif getattr(tok, "chat_template", None):
            self.chat_template = tok.chat_template
        self._size_context(text_cfg)
        self._warmup()
        self.load_seconds = time.monotonic() - t0
        n_params = sum(p.numel() for p in model.parameters())
        log.info("loaded %s: %s, %.0fM parameters, %d layers, on %s, %s, in %.1f s", self.config.served_model_name,
                 type(model).__name__, n_params / 1e6, text_cfg.num_hidden_layers, self.device,
                 str(self.dtype).replace("torch.", ""), self.load_seconds)
        log.info("HISA: %s", "off (--no-hisa: dense attention)" if cfg.no_hisa else hcfg.to_dict())
        log.info("longest context that fits: %d tokens (max_model_len); KV budget %d tokens for all running "
                 "requests; prefill chunk %d; prefix cache %d tokens; queue %d, %d running at most",
                 self.max_model_len, self.kv_budget_tokens, self.prefill_chunk, self.prefix_cache.max_tokens,
                 cfg.max_queue, cfg.max_num_seqs)
        if self.metrics:
            self.metrics.labels(self.metrics.max_model_len).set(self.max_model_len)

    @staticmethod
    def _device_name(model) -> str:
        return str(next(model.parameters()).device)

    @staticmethod
    def _fast_sparse_path(model) -> bool:
        """Whether HISA's sparse attention runs on fast kernels for this model's device."""
        from hisa import ops  # noqa: PLC0415 - the dispatch seam, no kernel import here

        probe = next(model.parameters())
        try:
            return ops.backend_for(probe.new_empty(1, 1, 1, 1)) == "triton"
        except RuntimeError:
            return False

    def _warmup(self) -> None:
        """One tiny prefill + decode so the first request does not pay for lazy initialisation; with the GPU
        kernels also one sparse prefill past the dense crossover, so their JIT compilation (seconds) happens
        here rather than in a user's first long request."""
        pad = int(next(iter(self.eos_ids), 0))
        n_sparse = min(self.max_model_len - 8, WARMUP_SPARSE_TOKENS, self.prefill_chunk)
        runs = [(80, {})]  # >= hisa.cache.APPEND_KERNEL_MIN: compiles the one-launch append too
        if not self.slow_sparse_path and self.hisa_config.enabled and n_sparse > self.hisa_config.top_k:
            runs.append((n_sparse, {"min_context": 0}))
        if len(runs) > 1:  # compile the kernels for every context-length bucket up to max_model_len
            t0 = time.monotonic()
            try:
                lengths = hisa.warmup(self.model, self.max_model_len)
                log.info("HISA kernels warmed up for %d context buckets in %.1f s", len(lengths),
                         time.monotonic() - t0)
            except Exception:  # noqa: BLE001 - a failed warm-up only costs first-request latency
                log.exception("HISA kernel warm-up failed; kernels will compile on first use")
        for n, overrides in runs:
            cache = hisa.new_cache(self.model, max_cache_len=n + 8)
            try:
                with hisa.override(**overrides):
                    ids = torch.full((1, n), pad, dtype=torch.long, device=self.device)
                    logits = self.forward(ids, cache)
                    logits = self.decode_step(logits.argmax(-1, keepdim=True), cache)
                    if self.stepper.graphs and not overrides:
                        # the recorded follow-up step too (compiles its kernel variants now, not on the first
                        # idle moment after a user's request)
                        self.stepper.chunk(ids[:, :3], cache)
                    cache.crop_to(n - 5)  # prefix reuse cuts caches: compile that kernel now (~0.4 s on first use)
            finally:
                cache.release()

    def _size_context(self, text_cfg) -> None:
        cfg = self.config
        cuda = self.device.type == "cuda"
        self.prefill_chunk = cfg.prefill_chunk or (8192 if cuda else 2048)
        n_layers = text_cfg.num_hidden_layers
        n_heads = text_cfg.num_attention_heads
        kv_heads = getattr(text_cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // n_heads
        elem = torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 2
        per_token = n_layers * kv_heads * head_dim * 2 * elem
        per_token += math.ceil(n_layers * kv_heads * head_dim * 2 * 4 / self.hisa_config.block_size)  # pooled
        self.kv_bytes_per_token = per_token
        native = getattr(text_cfg, "max_position_embeddings", None) or 8192
        if cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free
            budget = total * cfg.gpu_memory_utilization - used_by_others
            hidden = text_cfg.hidden_size
            inter = getattr(text_cfg, "intermediate_size", 4 * hidden)
            act = self.prefill_chunk * (8 * hidden + 3 * inter + 4 * n_heads * head_dim) * elem
            act += self.vocab_size * 4 * 4 + (512 << 20)  # logits, allocator slack
            fit = int(max(0, budget - act) // per_token)
            log.info("GPU memory: %.1f GiB total, %.1f GiB free; KV+pooled %.1f KiB/token; activations ~%.2f GiB",
                     total / 2**30, free / 2**30, per_token / 1024, act / 2**30)
            self.kv_budget_tokens = fit
            max_len = min(native, fit)
        else:
            max_len = native
        if cfg.max_model_len:
            if cfg.max_model_len > native:
                log.warning("--max-model-len %d is beyond the model's %d positions: quality may drop",
                            cfg.max_model_len, native)
            if cuda and cfg.max_model_len > self.kv_budget_tokens:
                log.warning("--max-model-len %d does not fit in GPU memory: using %d", cfg.max_model_len,
                            self.kv_budget_tokens)
                max_len = self.kv_budget_tokens
            else:
                max_len = cfg.max_model_len
        if max_len < 16:
            raise RuntimeError(f"only {max_len} tokens of context fit in memory: use a smaller model or --dtype")
        self.max_model_len = int(max_len)
        if not cuda:
            self.kv_budget_tokens = self.max_model_len * max(1, cfg.max_num_seqs)
        pc = cfg.prefix_cache_tokens
        if pc is None:
            pc = self.kv_budget_tokens if cuda else 2 * self.max_model_len
        self.prefix_cache = PrefixCache(min(pc, self.kv_budget_tokens) if cuda else pc)

    # -- tokenization helpers (called from HTTP handlers, in a worker thread) --------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise APIError("this model has no chat template: start the server with --chat-template, or use "
                           "/v1/completions", status=400, param="messages", code="no_chat_template")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      chat_template=self.chat_template, **kwargs)
        except Exception as e:  # jinja errors (e.g. a template that rejects a role order)
            raise APIError(f"the chat template could not render these messages: {e}", param="messages",
                           code="chat_template_error") from e

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; a long text sharing a prefix with a recent one (a follow-up question about
        the same document) re-tokenizes only its end (server/tokcache.py; same ids as a full tokenization)."""
        if self.prompt_tokenizer is not None:
            return self.prompt_tokenizer.encode(text, add_special_tokens)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- submission (event-loop side) ------------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        if self.load_error is not None:
            raise APIError(f"the model failed to load: {self.load_error}", status=500, type="server_error")
        if self.loading:
            raise APIError("the model is still loading; retry shortly", status=503, code="model_loading",
                           headers={"Retry-After": "5"})
        with self._cv:
            if self._stop:
                raise APIError("the server is shutting down", status=503, headers={"Retry-After": "5"})
            # a free running slot counts as room too: a burst arriving before the worker admits the first
            # requests is not refused (and --max-queue 0 means "no waiting", not "refuse everything")
            free = max(0, self.config.max_num_seqs - len({id(s.req) for s in self._active}))
            if len(self._waiting) >= self.config.max_queue + free:
                if self.metrics:
                    self.metrics.labels(self.metrics.rejected, reason="queue_full").inc()
                raise APIError(f"the server is busy: {len(self._waiting)} requests are already waiting "
                               f"(--max-queue {self.config.max_queue}); retry shortly", status=503,
                               code="queue_full", headers={"Retry-After": "2"})
            self._waiting.append(req)
            self._set_gauges()
            self._cv.notify_all()

    def abort(self, req: GenRequest) -> None:
        """Cancel ``req`` (client gone): dropped from the queue now, or stopped by the worker at its next
        step (between prefill chunks too), which frees its cache."""
        if req.finished:
            return
        req.cancelled = True
        with self._cv:
            if req in self._waiting:
                self._waiting.remove(req)
                req.finished = True
                if self.metrics:
                    self.metrics.labels(self.metrics.aborted, reason="cancelled").inc()
                self._set_gauges()
            self._cv.notify_all()

    # -- introspection -------------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._cv:
            active = list(self._active)
            waiting = len(self._waiting)
        live = {"kv": 0, "pooled": 0}
        for seq in active:
            cache = seq.cache
            if cache is None:
                continue
            try:  # the worker may be releasing it right now
                sizes = cache.nbytes()
            except (AttributeError, TypeError):
                continue
            for k, v in sizes.items():
                live[k] += v
        prefix = self.prefix_cache.nbytes() if self.prefix_cache else {"kv": 0, "pooled": 0}
        return {
            "running_sequences": len(active),
            "running_requests": len({id(s.req) for s in active}),
            "waiting_requests": waiting,
            "live_cache_bytes": live,
            "prefix_cache_bytes": prefix,
            "prefix_cache_entries": len(self.prefix_cache) if self.prefix_cache else 0,
            "prefix_cache_tokens": self.prefix_cache.tokens if self.prefix_cache else 0,
        }

    def _set_gauges(self) -> None:
        m = self.metrics
        if not m:
            return
        m.labels(m.waiting).set(len(self._waiting))
        m.labels(m.running).set(len({id(s.req) for s in self._active}))

    def _set_memory_gauges(self) -> None:
        m = self.metrics
        if not m:
            return
        s = self.stats()
        m.labels(m.kv_bytes).set(s["live_cache_bytes"]["kv"])
        m.labels(m.pooled_bytes).set(s["live_cache_bytes"]["pooled"] + s["prefix_cache_bytes"]["pooled"])
        m.labels(m.prefix_bytes).set(sum(s["prefix_cache_bytes"].values()))
        m.labels(m.prefix_tokens).set(s["prefix_cache_tokens"])
        if self.device is not None and self.device.type == "cuda":
            m.labels(m.gpu_allocated).set(torch.cuda.memory_allocated(self.device))
            m.labels(m.gpu_peak).set(torch.cuda.max_memory_allocated(self.device))

    # -- the worker thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._load()
        except BaseException as e:  # noqa: BLE001 - reported to the app, which stops the server
            self.load_error = e
            log.exception("model loading failed")
            if self.on_load_failed:
                self.on_load_failed(e)
            return
        self.ready.set()
        with torch.inference_mode():
            while True:
                try:
                    with self._cv:
                        idle = not self._waiting and not self._active
                    if idle and self._trim_pending:
                        self._trim_gpu_memory()
                    if idle and self._prepare is not None:
                        self._prepare_followup()
                    with self._cv:
                        while not self._stop and not self._waiting and not self._active:
                            self._cv.wait(1.0)
                        if self._stop:
                            break
                        admitted = self._admit()
                    if admitted:
                        self._set_memory_gauges()
                    for seq in list(self._active):
                        self._step_safely(seq)
                except Exception:  # noqa: BLE001 - the worker must survive: fail what was running, go on
                    log.exception("engine loop error; failing the running requests")
                    self._fail_active()
        for seq in list(self._active):
            self._drop(seq)

    def _prepare_followup(self) -> None:
        """While idle: record the short-chunk CUDA-graph step over the cache of the request that finished last
        (now in the prefix cache), so that a follow-up question on the same document only replays it."""
        cache, tag = self._prepare
        self._prepare = None
        try:
            t0 = time.monotonic()
            with hisa.override(**dict(tag or ())):
                ready = self.stepper.prepare_chunk(cache)
            log.debug("follow-up step over the last cache (%d tokens): %s (%.1f ms)", cache.get_seq_length(),
                      "ready" if ready else "not recordable", 1000 * (time.monotonic() - t0))
        except Exception:  # noqa: BLE001 - only an optimisation
            log.exception("preparing the follow-up step failed")

    def _trim_gpu_memory(self) -> None:
        """When the engine goes idle after requests ended: give the memory pools of their dropped CUDA graphs
        (and other freed blocks) back to the driver, so that GPU memory returns to its resting level."""
        self._trim_pending = False
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
            self._set_memory_gauges()

    def _fail_active(self) -> None:
        for seq in list(self._active):
            try:
                self._drop(seq)
                self._end_request(seq.req, error=APIError("internal error in the generation engine", status=500,
                                                          type="server_error", code="internal_error"))
            except Exception:  # noqa: BLE001
                log.exception("could not fail request %s cleanly", seq.req.id)
                if seq in self._active:
                    self._active.remove(seq)

    def _admit(self) -> bool:
        """Move waiting requests to running, FIFO, while sequences and the KV budget allow (called with
        the lock held). A request that fits nowhere still runs when nothing else does."""
        admitted = False
        while self._waiting:
            running = {id(s.req) for s in self._active}
            if len(running) >= self.config.max_num_seqs:
                break
            req = self._waiting[0]
            job = req.jobs[0]
            need = len(job.prompt_ids) + min(req.params.max_tokens, GROWTH_RESERVE)
            reserved = sum(s.reserve for s in self._active)
            if self._active and reserved + need > self.kv_budget_tokens:
                break
            t0 = time.monotonic()
            freed = self.prefix_cache.evict_to(max(0, self.kv_budget_tokens - reserved - need))
            if freed:
                log.debug("%s: evicted %d cached tokens to make room (%.1f ms)", req.id, freed,
                          1000 * (time.monotonic() - t0))
            self._waiting.popleft()
            req.jobs.popleft()
            req.started = time.monotonic()
            if self.metrics:
                self.metrics.labels(self.metrics.queue).observe(req.started - req.arrival)
            self._active.append(Sequence(req, job, self))
            admitted = True
        self._set_gauges()
        return admitted

    def _step_safely(self, seq: Sequence) -> None:
        try:
            self._step(seq)
        except _Cancelled:  # the client left in the middle of a prefill chunk
            self._drop(seq)
            self._end_request(seq.req, cancelled=True)
        except Exception as e:  # noqa: BLE001 - one request fails, the server keeps serving
            oom = isinstance(e, torch.OutOfMemoryError)
            log.exception("request %s failed", seq.req.id)
            self._drop(seq)
            if oom and self.device.type == "cuda":
                self.prefix_cache.clear()
                torch.cuda.empty_cache()
            msg = ("out of memory while computing this request; retry with a shorter prompt" if oom
                   else f"internal error while generating: {type(e).__name__}: {e}")
            self._end_request(seq.req, error=APIError(msg, status=500, type="server_error",
                                                      code="out_of_memory" if oom else "internal_error"))

    def _step(self, seq: Sequence) -> None:
        req = seq.req
        if req.cancelled:
            self._drop(seq)
            self._end_request(req, cancelled=True)
            return
        if seq.cache is None:
            self._begin(seq)
        if self._fault_file:
            self._injected_fault("prefill" if seq.pos < seq.prompt_len else "decode")
        if seq.pos < seq.prompt_len:
            self._prefill_chunk(seq)
        else:
            self._decode(seq)

    def _decode(self, seq: Sequence) -> None:
        """One decode step. With lookahead, the step that feeds the newest token is enqueued before that token
        is read on the host (``seq.pending``): the GPU computes token n+1 while the host delivers token n
        (detokenising, stop strings, streaming), so it never waits for the host between tokens. When token n
        ends the answer (end of sequence, a stop string), the step computed from it is dropped; its K/V stays
        in the cache, which then holds every generated token (the prefix cache records how many it holds)."""
        pending = seq.pending
        seq.pending = None
        if pending is None or self._may_continue(seq):
            logits = self._tracked(seq, self.decode_step, seq.last, seq.cache)
            nxt = seq.sampler.sample_async(logits)
            seq.last = nxt.token
            if not self.lookahead:  # (then nothing is ever pending)
                self._deliver(seq, nxt)
                return
            seq.pending = nxt  # in flight: ending or dropping the job waits for it (see _settle)
        if pending is not None:
            self._deliver(seq, pending)

    @staticmethod
    def _settle(seq: Sequence) -> None:
        """Wait for a decode step still in flight on the job's cache (lookahead) before the cache is handed to
        the prefix cache or released, so that no recorded graph is dropped while the GPU runs it."""
        pending, seq.pending = seq.pending, None
        if pending is not None:
            try:
                pending.wait()
            except Exception:  # noqa: BLE001 - the job ends either way; the error shows in the log
                log.exception("a decode step in flight failed")

    def _may_continue(self, seq: Sequence) -> bool:
        """Whether the answer may go on after its pending token (it is not the last one its length allows)."""
        n = len(seq.generated) + 1
        return n < seq.max_tokens and seq.prompt_len + n < self.max_model_len

    def _begin(self, seq: Sequence) -> None:
        """Find a cached prefix (reused K/V and pooled keys) or allocate a fresh preallocated cache."""
        req = seq.req
        t0 = time.monotonic()
        room = seq.reserve + FOLLOWUP_ROOM
        cache, shared = self.prefix_cache.take(seq.prompt, req.cache_tag, capacity=room)
        if cache is not None:
            keep = min(shared, seq.prompt_len - 1)  # always recompute the last prompt token (for its logits)
            cache.crop_to(keep)
            cache.reserve(room)  # one reallocation now if the reused cache is too small for this prompt
            seq.pos = seq.cached = keep
            log.debug("%s: reusing %d cached tokens (lookup and cut %.1f ms)", req.id, keep,
                      1000 * (time.monotonic() - t0))
        else:
            cache = hisa.new_cache(self.model, max_cache_len=room)
        seq.cache = cache
        if req.generator is None and not req.params.greedy:
            req.generator = torch.Generator(device=self.device)
            if req.params.seed is None:
                req.generator.seed()
            else:
                req.generator.manual_seed(req.params.seed % (1 << 64))
        seq.sampler = SamplerState(req.params, self.vocab_size, self.device, seq.prompt, req.generator)
        if seq.cached:
            req.emit(Progress(seq.job.index, seq.pos, seq.prompt_len, seq.cached))

    def _prefill_chunk(self, seq: Sequence) -> None:
        start = seq.pos
        end = min(seq.prompt_len, start + self.prefill_chunk)
        ids = seq.prompt[start:end].to(self.device, non_blocking=True).view(1, -1)
        self._prefilling = seq  # lets _cancel_hook stop this chunk between layers
        try:
            if start > 0 and end - start <= GRAPH_CHUNK_MAX and self.stepper.graphs:
                # a few tokens after a cached prefix (a follow-up question): replayed CUDA-graph steps instead
                # of an eager forward whose host-side launches cost more than the GPU work
                replays = self.stepper.replays
                logits = self._tracked(seq, self.stepper.chunk, ids, seq.cache)[0]
                log.debug("%s: %d prompt tokens after the cached ones, %d graph replays", seq.req.id, end - start,
                          self.stepper.replays - replays)
            else:
                logits = self._tracked(seq, self.forward, ids, seq.cache)
        finally:
            self._prefilling = None
        seq.pos = end
        seq.req.emit(Progress(seq.job.index, end, seq.prompt_len, seq.cached))
        if end == seq.prompt_len:
            if self.metrics:
                self.metrics.labels(self.metrics.prefill).observe(time.monotonic() - seq.t_start)
            self._accept(seq, logits)

    def _cancel_hook(self, module, args) -> None:
        """Forward pre-hook of every decoder layer: a prefill chunk whose client has gone stops at the
        next layer instead of finishing (a long chunk can take seconds on a CPU)."""
        seq = self._prefilling
        if seq is not None and seq.req.cancelled:
            raise _Cancelled(seq.req.id)

    # -- model calls -----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Run ``input_ids`` [1, L] through the model on top of ``cache``; logits of the last position only."""
        return self.stepper.forward(input_ids, cache)[0]

    def _injected_fault(self, phase: str) -> None:
        """Fault injection for the reliability tests (env ``HISA_TEST_FAULT_FILE``, never set in production):
        when that file exists and holds ``oom`` (any step), ``oom:prefill`` (a prefill chunk) or ``oom:decode``
        (a decode step), it is deleted and this step raises ``torch.OutOfMemoryError``."""
        try:
            with open(self._fault_file) as f:
                what = f.read().strip()
        except OSError:
            return
        if what not in ("oom", f"oom:{phase}"):
            return
        with contextlib.suppress(OSError):
            os.remove(self._fault_file)
        raise torch.OutOfMemoryError(f"injected by HISA_TEST_FAULT_FILE during {phase}")

    def decode_step(self, token: torch.Tensor, cache) -> torch.Tensor:
        """One decode step: the last sampled ``token`` (a device tensor of one id) over ``cache``; returns
        the next-token logits (replayed from a CUDA graph recorded over this cache on the GPU)."""
        return self.stepper(token.view(1), cache)[0]

    def _tracked(self, seq: Sequence, fn, *args):
        overrides = seq.req.overrides
        with contextlib.ExitStack() as stack:
            if overrides:
                stack.enter_context(hisa.override(**overrides))
            stats = stack.enter_context(hisa.track())
            out = fn(*args)
        seq.attended += stats.attended
        seq.visible += stats.total
        seq.layers = max(seq.layers, len(stats.layers))
        return out

    # -- tokens out ------------------------------------------------------------------------------------
    def _accept(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample from ``logits`` and deliver the token now (the first token of an answer)."""
        pending = seq.sampler.sample_async(logits)
        seq.last = pending.token
        self._deliver(seq, pending)

    def _deliver(self, seq: Sequence, pending: PendingSample) -> bool:
        """Read a sampled token on the host, stream it, and end the job if it ends the answer; returns
        whether the job ended."""
        req = seq.req
        sample = pending.result()
        now = time.monotonic()
        m = self.metrics
        if m:
            if seq.t_last is None:
                if req.first_token is None:
                    req.first_token = now
                    m.labels(m.ttft).observe(now - req.arrival)
            else:
                m.labels(m.itl).observe(now - seq.t_last)
        seq.t_last = now
        tok = sample.token
        seq.generated.append(tok)
        finish = None
        if tok in self.eos_ids and not req.params.ignore_eos:
            text = seq.text.flush()
            finish = "stop"
        else:
            text = seq.text.push(tok)
            if seq.text.stopped:
                finish = "stop"
            elif len(seq.generated) >= seq.max_tokens or seq.prompt_len + len(seq.generated) >= self.max_model_len:
                text += seq.text.flush()
                finish = "length"
        req.emit(Delta(seq.job.index, text, tok, sample, finish))
        if finish:
            self._finish_job(seq, finish)
        return finish is not None

    def _finish_job(self, seq: Sequence, reason: str) -> None:
        req = seq.req
        self._settle(seq)
        u = req.usage
        key = tuple(seq.job.prompt_ids)
        if key not in req._seen_prompts:  # n choices of one prompt count its tokens once, like OpenAI
            req._seen_prompts.add(key)
            u["prompt_tokens"] += seq.prompt_len
            u["cached_tokens"] += seq.cached
            if self.metrics:
                self.metrics.labels(self.metrics.prompt_tokens).inc(seq.prompt_len)
                self.metrics.labels(self.metrics.cached_tokens).inc(seq.cached)
        u["completion_tokens"] += len(seq.generated)
        u["attended"] += seq.attended
        u["visible"] += seq.visible
        u["layers"] = max(u["layers"], seq.layers)
        if self.metrics:
            m = self.metrics
            m.labels(m.generation_tokens).inc(len(seq.generated))
            m.labels(m.attended).inc(seq.attended)
            m.labels(m.visible).inc(seq.visible)
            m.labels(m.requests, finished_reason=reason).inc()
        # keep the cache for follow-ups: it holds K/V of prompt + generated tokens except the last one
        cache = seq.cache
        seq.cache = None
        # the cache keeps its recorded decode graph: a follow-up that takes this prefix replays it without
        # recording again (the graph dies with the cache when the prefix cache evicts it)
        self._trim_pending = True
        if self.stepper.graphs:
            self._prepare = (cache, req.cache_tag)
            # only the most recent cached documents keep their graphs (each holds a memory pool of a few MB)
            self._graph_holders.append(cache)
            while len(self._graph_holders) > GRAPH_HOLDERS:
                hisa.DecodeStep.forget(self._graph_holders.popleft())
        held = cache.get_seq_length()
        tokens = torch.cat((seq.prompt, ids_tensor(seq.generated)))[:held]
        self.prefix_cache.put(tokens, cache, req.cache_tag)
        with self._cv:
            idx = self._active.index(seq)
            if req.jobs and not req.cancelled:
                self._active[idx] = Sequence(req, req.jobs.popleft(), self)
            else:
                self._active.pop(idx)
                self._end_request(req)
            self._set_gauges()
        self._set_memory_gauges()

    def _drop(self, seq: Sequence) -> None:
        """Free a sequence's cache (cancellation / failure) and remove it from the running set."""
        self._settle(seq)
        if seq.cache is not None:
            seq.cache.release()
            seq.cache = None
            self._trim_pending = True
        with self._cv:
            if seq in self._active:
                self._active.remove(seq)
            self._set_gauges()
        self._set_memory_gauges()

    def _end_request(self, req: GenRequest, cancelled: bool = False, error: APIError | None = None) -> None:
        if req.finished:
            return
        req.finished = True
        m = self.metrics
        if cancelled or error:
            log.info("%s %s after %.3fs", req.id, "cancelled (client gone)" if cancelled else f"failed: {error.message}",
                     time.monotonic() - req.arrival)
            if m:
                m.labels(m.aborted, reason="cancelled" if cancelled else "error").inc()
            if error:
                req.emit(Failed(error))
            return
        u = req.usage
        usage = {
            "prompt_tokens": u["prompt_tokens"],
            "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]},
            "hisa": self._hisa_usage(req),
        }
        now = time.monotonic()
        log.info("%s done: %d prompt tokens (%d cached), %d generated, request handling %.3fs, queue %.3fs, "
                 "first token %.3fs, total %.3fs, attention read %.1f%% of visible KV", req.id, u["prompt_tokens"],
                 u["cached_tokens"], u["completion_tokens"], req.arrival - req.received,
                 (req.started or now) - req.arrival, (req.first_token or now) - req.arrival,
                 now - req.arrival, 100.0 * usage["hisa"]["fraction"])
        if m:
            m.labels(m.e2e).observe(now - req.arrival)
            if u["visible"]:
                m.labels(m.fraction).set(u["attended"] / u["visible"])
        req.emit(Done(usage))

    def _hisa_usage(self, req: GenRequest) -> dict:
        u = req.usage
        layers = max(1, u["layers"])
        cfg = self.hisa_config.replace(**req.overrides) if req.overrides else self.hisa_config  # validated
        return {
            "enabled": cfg.enabled,
            "attended_kv_tokens": u["attended"] // layers,
            "visible_kv_tokens": u["visible"] // layers,
            "fraction": round(u["attended"] / u["visible"], 6) if u["visible"] else 1.0,
            "top_k": cfg.top_k,
            "top_blocks": cfg.top_blocks,
            "block_size": cfg.block_size,
        }


def resolve_overrides(base, options: dict) -> dict:
    """Per-request HISA changes, completed so that the budget stays consistent (top_k alone raises
    top_blocks as needed; top_blocks alone lowers top_k to what the kept blocks hold). Raises ValueError
    when the combination is invalid."""
    out = dict(options)
    bs = base.block_size
    if "top_k" in out and "top_blocks" not in out:
        out["top_blocks"] = max(base.top_blocks, -(-out["top_k"] // bs))
    elif "top_blocks" in out and "top_k" not in out:
        out["top_k"] = min(base.top_k, out["top_blocks"] * bs)
    base.replace(**out)  # validates
    with hisa.override(**out):  # validates the names/values the way the attention layer will
        pass
    return out


def _read_template(value: str) -> str:
    from pathlib import Path  # noqa: PLC0415

    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text()
    except OSError:
        pass
    if "{" not in value:
        raise FileNotFoundError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value
