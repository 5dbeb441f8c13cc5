"""Token sampling on the model's device: penalties, temperature, top-k / top-p / min-p, seeded draws and
log-probabilities, with a single device->host transfer per token.

``SamplerState.sample_async`` only enqueues that work and the transfer (into pinned memory, behind a CUDA
event) and returns at once; ``PendingSample.result()`` waits for it. The engine uses the gap to enqueue the
next decode step before it reads this token, so the GPU never waits for the host between tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1


@dataclass
class Sample:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


# rows at least this long take the two-level argmax on CUDA (one long single-row reduction is slow there)
ARGMAX_SPLIT_MIN = 16384
ARGMAX_CHUNKS = 256


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Index [1] of the first largest value of the 1-D ``x``, as ``x.argmax(-1, keepdim=True)``.

    On CUDA a single reduction over a 128k-entry vocabulary runs in one thread block (36 us on an H200);
    here the row is cut into ``ARGMAX_CHUNKS`` chunks reduced in parallel, then the best chunk is taken:
    the first chunk holding the maximum, and inside it the first position, so ties and NaN resolve as
    ``torch.argmax`` resolves them."""
    if x.device.type != "cuda" or x.shape[-1] < ARGMAX_SPLIT_MIN:
        return x.argmax(-1, keepdim=True)
    return _split_argmax(x)


def _split_argmax(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    width = -(-n // ARGMAX_CHUNKS)
    pad = width * ARGMAX_CHUNKS - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=float("-inf"))
    vals, idx = x.view(ARGMAX_CHUNKS, width).max(-1)
    j = vals.argmax(-1, keepdim=True)
    return idx.gather(0, j) + j * width


class PendingSample:
    """A sampled token whose host copy may still be in flight: ``token`` (a device tensor [1]) can feed the
    next step right away; ``result()`` waits for the copy and returns the :class:`Sample`."""

    def __init__(self, token: torch.Tensor, packed: torch.Tensor, params: SamplingParams):
        self.token = token
        self._p = params
        self._event = None
        if packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed
        self._sample: Sample | None = None

    def wait(self) -> None:
        """Block until the sampling (and everything enqueued before it) has run."""
        if self._event is not None:
            self._event.synchronize()

    def result(self) -> Sample:
        if self._sample is None:
            self.wait()
            host = self._host.tolist()  # the one sync per token
            sample = Sample(int(host[0]))
            p = self._p
            if p.logprobs:
                sample.logprob = host[1]
                if p.top_logprobs:
                    k = p.top_logprobs
                    sample.top = [(int(i), v) for i, v in zip(host[2 : 2 + k], host[2 + k : 2 + 2 * k])]
                else:
                    sample.top = []
            self._sample = sample
        return self._sample


class SamplerState:
    """Per-sequence sampling state kept on the device: output-token counts (for presence / frequency
    penalties), a mask of seen tokens (repetition penalty), the logit bias and a seeded generator."""

    def __init__(self, params: SamplingParams, vocab_size: int, device,
                 prompt_ids: list[int] | torch.Tensor | None = None, generator: torch.Generator | None = None):
        self.p = params
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.counts = None
        self.seen = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            if prompt_ids is not None and len(prompt_ids):
                ids = torch.as_tensor(prompt_ids, dtype=torch.long)
                self.seen[ids[ids < vocab_size].to(self.device)] = True
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
            for tok, b in params.logit_bias.items():
                self.bias[tok] = b
        if generator is None and not params.greedy:
            generator = torch.Generator(device=self.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed % (1 << 64))
        self.generator = generator

    def observe(self, token: torch.Tensor) -> None:
        """Record a sampled token (a device tensor: no host sync)."""
        if self.counts is not None:
            self.counts.index_add_(0, token.view(1), torch.ones(1, device=self.device))
        if self.seen is not None:
            self.seen.index_fill_(0, token.view(1), True)

    def sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, Sample]:
        """``logits`` [vocab] (any float dtype) -> (token as a device tensor, Sample on the host)."""
        pending = self.sample_async(logits)
        return pending.token, pending.result()

    def sample_async(self, logits: torch.Tensor) -> PendingSample:
        """Enqueue the sampling of ``logits`` [vocab] and the copy of its result to the host; no host sync.
        ``logits`` may be overwritten by work enqueued after this call (it is read in stream order)."""
        p = self.p
        raw = logits.float()
        if raw.shape[-1] > self.vocab_size:  # padded embedding tables
            raw = raw[..., : self.vocab_size]
        x = raw
        if self.bias is not None:
            x = x + self.bias
        if self.seen is not None:
            rp = p.repetition_penalty
            x = torch.where(self.seen, torch.where(x > 0, x / rp, x * rp), x)
        if self.counts is not None:
            x = x - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        if p.greedy:
            token = argmax(x)
        else:
            x = x / p.temperature
            if p.top_k and p.top_k > 0 and p.top_k < x.shape[-1]:
                kth = torch.topk(x, p.top_k).values[-1]
                x = x.masked_fill(x < kth, float("-inf"))
            probs = torch.softmax(x, dim=-1)
            if p.min_p > 0:
                probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                cum = sorted_p.cumsum(-1)
                drop_sorted = (cum - sorted_p) > p.top_p  # keep the smallest set reaching top_p
                drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
                probs = probs.masked_fill(drop, 0.0)
            # exponential race == multinomial draw, without a host sync and reproducible with the generator
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            token = argmax(probs / noise)
        parts = [token.double()]
        want_lp = p.logprobs
        if want_lp:
            lsm = torch.log_softmax(raw, dim=-1)
            parts.append(lsm.gather(-1, token).double())
            if p.top_logprobs:
                vals, ids = torch.topk(lsm, p.top_logprobs)
                parts += [ids.double(), vals.double()]
        self.observe(token)
        return PendingSample(token, torch.cat(parts), p)
