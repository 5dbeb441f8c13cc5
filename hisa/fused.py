"""Fused elementwise code of the decoder layers: RMSNorm, rotary embeddings, SiLU-gate.

Besides its matmuls a transformers decoder layer runs ~20 elementwise kernels (RMSNorm alone is six passes in
float32, rotary embeddings ~10 with a concatenation, the MLP's gate two). In a one-token decode step they are
launch overhead; in a long prefill they are passes over [tokens, hidden] activations: at 128k tokens on an
H200 they took ~260 of a HISA prefill's 830 ms (docs/benchmarks.md). :func:`fused_elementwise` swaps the
standard RMSNorm, rotary-embedding and SiLU-gate code of the supported families (Llama, Qwen2/3, Mistral)
for one kernel each, for the duration of a ``with`` block, in one of two implementations of the same math:

* ``"compiled"``: the functions below compiled by torch.compile for fixed shapes, used while recording
  one-token decode steps in CUDA graphs (:mod:`hisa.graph`);
* ``"triton"``: the Triton kernels below, any shape, used for forwards of at least ``PREFILL_MIN_TOKENS``
  tokens (``apply_hisa``'s forward; ``HISA_FUSED_PREFILL=0`` turns it off).

Both round where the eager code rounds (to the activations' dtype after each operation), so they give the
model's own numbers; the Triton RMSNorm sums the squares in another order than PyTorch (float32), which may
move a value by one bf16/fp16 unit now and then. Long forwards also add each decoder layer's two residuals
inside the attention output and MLP down projections (cuBLAS's ``C = A @ B + C`` on a residual buffer passed
from layer to layer) instead of in separate passes over [tokens, hidden]. Module functions are swapped, so two models must not run
forwards in different threads at the same time while a block is active (the server runs one at a time).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}
MLPS = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}
LAYERS = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer"}
ATTENTIONS = {"LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention"}
PREFILL_MIN_TOKENS = 256  # forwards with fewer tokens keep the eager elementwise code
# long forwards add the residuals inside the output projections' matrix products (:func:`_residual_layer`;
# H200, 128k-token prefill of the 1B shape: 2-7 ms less per forward in alternating runs)
FUSE_RESIDUAL = True  # HISA_FUSE_RESIDUAL=0 (read per forward) turns it off too
# long forwards: the q/k/v projections as one matrix product each. Off: H200, 128k-token prefill of the 1B shape,
# 0.6262 s joined vs 0.6232 s separate (alternating runs); gate/up are never joined there (one [tokens,
# 2 x intermediate] product measured slower than two, and its halves are not contiguous for the SiLU-gate)
JOIN_PREFILL = False


# -- the math, as the eager code does it ---------------------------------------------------------------------
def rms_norm(x, weight, eps: float):
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def silu_mul(gate, up):
    return torch.nn.functional.silu(gate) * up


_COMPILED: dict = {}


def _compiled(name, fn):
    if name not in _COMPILED:
        # emulate_precision_casts: round where the eager code rounds (to bf16/fp16), so the fused kernels
        # give the model's own numbers rather than more precise, different ones
        _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True})
    return _COMPILED[name]


def _implementations(kind: str):
    if kind == "compiled":
        return _compiled("rms", rms_norm), _compiled("rope", rope), _compiled("silu_mul", silu_mul)
    if kind == "triton":
        from .kernels import elementwise  # noqa: PLC0415 - needs Triton

        return elementwise.rms_norm, elementwise.rope, elementwise.silu_mul
    if kind == "eager":  # the same math unfused (tests)
        return rms_norm, rope, silu_mul
    raise ValueError(f"unknown implementation {kind!r}")


# -- one matrix product for projections that read the same input ---------------------------------------------
def _is_linear(m) -> bool:
    return isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward


def _joined(linears):
    """The weight (and bias) of ``linears`` stacked along their outputs, or None when they cannot be: the
    parameters become views into the stacked storage (no copy kept; values unchanged), so that one matrix
    product computes all outputs. Cached; rebuilt when a parameter was replaced (e.g. by ``model.to``)."""
    if not all(_is_linear(m) for m in linears):
        return None
    w0 = linears[0].weight
    if any(m.weight.shape[1] != w0.shape[1] or m.weight.dtype != w0.dtype or m.weight.device != w0.device
           for m in linears):
        return None
    if len({m.bias is None for m in linears}) != 1:
        return None
    owner = linears[0]
    cached = owner.__dict__.get("_hisa_joined")
    if cached is not None:
        w, b, parts = cached
        if all(m.weight.data_ptr() == p for m, p in zip(linears, parts)) and \
                linears[0].weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr():
            return w, b
    with torch.no_grad():
        w = torch.cat([m.weight for m in linears])
        b = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = w[start:start + n]
            if b is not None:
                m.bias.data = b[start:start + n]
            start += n
    owner.__dict__["_hisa_joined"] = (w, b, [m.weight.data_ptr() for m in linears])
    return w, b


def _joined_projection(linears):
    """Forward functions for ``linears`` (same input) that run one matrix product: the first call computes
    every output and the others return their slice of it; a call with another input runs its own product."""
    joined = _joined(linears)
    if joined is None:
        return None
    w, b = joined
    sizes = [m.weight.shape[0] for m in linears]
    last = {}

    def make(i, m):
        def forward(x):
            if i == 0:
                out = torch.nn.functional.linear(x, w, b)
                last["x"], last["parts"] = x, out.split(sizes, dim=-1)
                return last["parts"][0]
            if last.get("x") is x:
                return last["parts"][i]
            return torch.nn.functional.linear(x, m.weight, m.bias)
        return forward

    return [make(i, m) for i, m in enumerate(linears)]


# -- residual additions inside the output projections --------------------------------------------------------
def _residual_linear(x, m, slot):
    """``m(x)`` (a bias-free Linear), or, when the layer left a residual in ``slot``, that residual with
    ``x @ W.T`` added in place by the matrix product itself (cuBLAS's ``C = A @ B + C``: the residual is read
    by the product's epilogue instead of by a separate addition pass over [tokens, hidden])."""
    r = slot.get("r")
    if r is None or r.shape[:-1] != x.shape[:-1] or not (r.dtype == x.dtype == m.weight.dtype):
        return torch.nn.functional.linear(x, m.weight, m.bias)
    slot["r"] = None
    r.view(-1, r.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), m.weight.t())
    return r


def _residual_layer(hidden_states, *args, layer, original, slot_attn, slot_mlp, own, **kwargs):
    """A decoder layer's forward (the same code in Llama, Qwen2/3 and Mistral) with both residual additions
    done by the output projections (:func:`_residual_linear`), in place on a residual buffer: the output of
    the previous fused layer (passed on from layer to layer) or a copy of the input (the first layer), so a
    caller's tensor is never modified. Positional extras, autograd or a non-contiguous input: the original."""
    if args or torch.is_grad_enabled() or not hidden_states.is_contiguous():
        return original(hidden_states, *args, **kwargs)
    r = hidden_states if own.get("last") is hidden_states else hidden_states.clone()
    for norm, block, slot in ((layer.input_layernorm, layer.self_attn, slot_attn),
                              (layer.post_attention_layernorm, layer.mlp, slot_mlp)):
        h = norm(r)
        slot["r"] = r
        try:
            out = block(hidden_states=h, **kwargs)[0] if block is layer.self_attn else block(h)
        finally:
            unused = slot.pop("r", None) is not None
        if unused:  # the projection did not take the residual (shapes or dtypes): add it as the layer does
            r.add_(out)
        elif out is not r:
            raise RuntimeError(f"{type(layer).__name__}: the output projection's result was changed afterwards")
    own["last"] = r
    return r


def _has(m, name: str) -> bool:
    """``hasattr(m, name)`` for a module without nn.Module's slow ``__getattr__`` miss path (this runs over every
    module at the start of each long forward)."""
    return (name in m.__dict__ or name in m._modules or name in m._parameters or name in m._buffers
            or hasattr(type(m), name))


def _set_forward(m, fn) -> None:
    """``m.forward = fn`` without nn.Module's ``__setattr__`` checks (``fn`` is a plain callable: what that
    method would do too)."""
    m.__dict__["forward"] = fn


def _fusable_layer(m) -> bool:
    if type(m).__name__ not in LAYERS:
        return False
    attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
    if type(attn).__name__ not in ATTENTIONS or type(mlp).__name__ not in MLPS:
        return False
    if not (_has(m, "input_layernorm") and _has(m, "post_attention_layernorm")):
        return False
    projs = (getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None))
    return all(_is_linear(p) and p.bias is None for p in projs) and not m._forward_hooks and \
        not m._forward_pre_hooks


def _fuse_residuals(modules, restore) -> None:
    own: dict = {}
    for m in modules:
        if not _fusable_layer(m):
            continue
        slot_attn, slot_mlp = {}, {}
        for proj, slot in ((m.self_attn.o_proj, slot_attn), (m.mlp.down_proj, slot_mlp)):
            old = proj.__dict__.get("forward")
            _set_forward(proj, functools.partial(_residual_linear, m=proj, slot=slot))
            restore.append(functools.partial(_restore_forward, proj, old))
        old = m.__dict__.get("forward")
        original = old if old is not None else functools.partial(type(m).forward, m)
        _set_forward(m, functools.partial(_residual_layer, layer=m, original=original, slot_attn=slot_attn,
                                          slot_mlp=slot_mlp, own=own))
        restore.append(functools.partial(_restore_forward, m, old))


@contextlib.contextmanager
def fused_elementwise(model, kind: str = "compiled", *, join_projections: bool = False, join_mlp: bool | None = None,
                      residual: bool = False):
    """Swap in the fused RMSNorm / rotary / SiLU-gate code of ``kind`` for the duration of the block.

    ``join_projections``: also compute the query/key/value projections of each attention module, and the
    gate/up projections of each MLP, as one matrix product each (at one token per step the weights are read
    by matrix-vector kernels that reach ~30-65 % of the memory bandwidth on small matrices; one product over
    the stacked matrix reads them at a better rate and launches fewer kernels). The parameters become views
    into the stacked weights (see :func:`_joined`). ``join_mlp`` (default: as ``join_projections``) applies
    it to the gate/up projections.

    ``residual``: the decoder layers of the supported families (without hooks) add their residuals inside
    the attention output and MLP down projections (:func:`_residual_layer`): one rounding of
    ``residual + x @ W.T`` instead of rounding the product and then the sum, so outputs may differ from the
    eager code's by a unit in the last place now and then. The layer outputs are reused as the next layer's
    residual buffer, so it must not be used when the caller keeps per-layer hidden states."""
    restore = []
    try:
        rms, rot, gate = _implementations(kind)
        modules = list(model.modules())
        if residual:
            _fuse_residuals(modules, restore)
        for m in modules:
            name = type(m).__name__
            if name in NORMS and _has(m, "variance_epsilon"):
                old = m.__dict__.get("forward")
                _set_forward(m, functools.partial(rms, weight=m.weight, eps=float(m.variance_epsilon)))
                restore.append(functools.partial(_restore_forward, m, old))
            elif name in MLPS and type(getattr(m, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU"):
                old = m.__dict__.get("forward")
                gate_up = _joined(_mlp_inputs(m)) if (join_projections if join_mlp is None else join_mlp) else None
                if gate_up is not None:
                    w, b = gate_up
                    inter = m.gate_proj.weight.shape[0]

                    def mlp(x, m=m, w=w, b=b, inter=inter):
                        gu = torch.nn.functional.linear(x, w, b)
                        return m.down_proj(gate(gu[..., :inter], gu[..., inter:]))

                    _set_forward(m, mlp)
                else:
                    _set_forward(m, lambda x, m=m: m.down_proj(gate(m.gate_proj(x), m.up_proj(x))))
                restore.append(functools.partial(_restore_forward, m, old))
            elif _has(m, "q_proj") and _has(m, "layer_idx"):
                mod = sys.modules.get(type(m).__module__)
                if mod is not None and hasattr(mod, "apply_rotary_pos_emb") and mod.apply_rotary_pos_emb is not rot:
                    original = mod.apply_rotary_pos_emb
                    mod.apply_rotary_pos_emb = rot
                    restore.append(lambda mod=mod, original=original: setattr(mod, "apply_rotary_pos_emb", original))
                projs = [getattr(m, p, None) for p in ("q_proj", "k_proj", "v_proj")]
                forwards = _joined_projection(projs) if join_projections else None
                for proj, fwd in zip(projs, forwards or ()):
                    old = proj.__dict__.get("forward")
                    _set_forward(proj, fwd)
                    restore.append(functools.partial(_restore_forward, proj, old))
        yield
    finally:
        for undo in reversed(restore):
            undo()


def _mlp_inputs(m):
    return [getattr(m, "gate_proj", None), getattr(m, "up_proj", None)]


def _restore_forward(m, old) -> None:
    if old is None:
        m.__dict__.pop("forward", None)
    else:
        _set_forward(m, old)


def prefill_fusion(model, n_tokens: int, *, keep_hidden_states: bool = False):
    """The fused Triton elementwise code (and, unless ``keep_hidden_states`` or ``FUSE_RESIDUAL`` is off,
    the residual additions in the output projections) for a forward of ``n_tokens`` tokens per sequence
    on CUDA when it pays off (``PREFILL_MIN_TOKENS``) and is available, else a no-op context."""
    if n_tokens < PREFILL_MIN_TOKENS or os.environ.get("HISA_FUSED_PREFILL", "1") == "0":
        return contextlib.nullcontext()
    param = next(model.parameters(), None)
    if param is None or not param.is_cuda:
        return contextlib.nullcontext()
    from .ops import _triton_backend  # noqa: PLC0415

    if _triton_backend() is None:
        return contextlib.nullcontext()
    residual = FUSE_RESIDUAL and os.environ.get("HISA_FUSE_RESIDUAL", "1") != "0" and not keep_hidden_states
    return fused_elementwise(model, "triton", join_projections=JOIN_PREFILL, join_mlp=False, residual=residual)
