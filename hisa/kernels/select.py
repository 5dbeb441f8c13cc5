"""Row-wise top-k *selection* (not sorting) in one Triton program per row.

Each row of ``scores`` is held in registers; the k-th largest value is found on the order-preserving
integer image of the float32 bits, without sorting, by one of five searches (``METHOD``):

* ``RADIX``: up to 4 passes of a 256-bin histogram of the key's bytes, stopping once the bin of
  the k-th largest is kept whole.
* ``RADIX4``: the same with 4-bit digits, up to 8 passes of a 16-bin histogram. A histogram's cost per entry
  grows with its bins (Triton counts with warp ballots per bit and per bin), so the extra passes are cheaper
  than the wide ones: in the graph decode's fused selections one layer took 32-33 / 39 us at head dim 64 / 128
  instead of 40 / 46 (H200, 128k).
* ``RADIX5``: 5-bit digits, up to 7 passes of a 32-bin histogram: one pass fewer than 4-bit digits on typical
  rows, and in the graph decode 1.6-2.3 / 0-1.3 us faster per layer at head dim 64 / 128 (H200, 128k; 6-bit
  digits were slower again); the graph decode's default (``decode.SELECT_METHOD``).
* ``RANGE`` (default of the eager kernels): passes of a 64-bin histogram over the value range still holding the
  k-th largest (its bounds the smallest and largest value in the previous pass's bin), typically 2-3.
* ``BISECT``: 32 counting passes of a bisection.

Then the kept columns are compacted in ascending column order with a prefix sum. Ties at the threshold keep
the lowest columns. Entries equal to -inf (masked) are never kept, so a row with fewer than k finite entries
keeps all of them; the output row is padded with -1.

Optional per-row visibility (``nvis`` columns visible, the first and the last visible column forced in
with +inf) implements HISA's stage-1 rules without a separate masking pass, and an optional block map
turns a candidate column ``j`` into the token index ``block_map[row, j // bs] * bs + j % bs``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_SELECT_WIDTH = 16384  # wider rows fall back to torch.topk
BISECT, RADIX, RANGE, RADIX4, RADIX5 = 0, 1, 2, 3, 5  # the threshold searches (module docstring)
SELECT_METHOD = RANGE  # the search the kernels use (measured on an H200: docs/kernels.md)


@triton.jit
def _range_search(x, key, valid, K, NBINS: tl.constexpr, NPASS: tl.constexpr):
    """(gt, eq): the valid entries above / at the K-th largest valid entry (all valid entries when there
    are at most K; ``eq`` may hold more entries than are kept: ties), by histograms over value ranges.

    Each pass spreads the candidates (finite entries in [lo, hi]) over NBINS equal-width bins of [lo, hi] (a
    monotone map, so the bins are ordered), keeps the bin holding the K-th largest and narrows [lo, hi] to the
    smallest and largest value in it; it stops when that bin is kept whole or holds one value. +inf entries
    (forced) are kept first. A bisection on the keys settles the rare rows that NPASS passes do not (values a
    few ulps apart, or spanning more than the float range)."""
    fin = valid & (x < float("inf"))
    n_inf = tl.sum((valid & ~fin).to(tl.int32), 0)
    krem = K - n_inf  # still to take from [lo, hi]
    lo = tl.min(tl.where(fin, x, float("inf")), 0)
    hi = tl.max(tl.where(fin, x, float("-inf")), 0)
    done = (tl.sum(fin.to(tl.int32), 0) <= krem) | (krem <= 0)
    bins = tl.arange(0, NBINS)
    for p in tl.static_range(NPASS):
        if not done:
            cand = fin & (x >= lo) & (x <= hi)
            # bin of x: monotone in x, in [0, NBINS) also when hi - lo over- or underflows (NaN -> last bin:
            # only x - lo = inf times a zero scale gives NaN, and those are the largest entries)
            t = tl.where(x > lo, (x - lo) * (NBINS / (hi - lo)), 0.0)
            b = tl.where(t < NBINS, t, NBINS - 1).to(tl.int32)
            hist = tl.histogram(b, NBINS, mask=cand)
            ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # candidates in bins >= j
            d = tl.max(tl.where(ge >= krem, bins, 0), 0)
            in_bin = tl.sum(tl.where(bins == d, hist, 0), 0)
            krem -= tl.sum(tl.where(bins > d, hist, 0), 0)
            inb = cand & (b == d)
            lo = tl.min(tl.where(inb, x, float("inf")), 0)
            hi = tl.max(tl.where(inb, x, float("-inf")), 0)
            done = (in_bin == krem) | (lo >= hi)
    gt = (valid & ~fin) | (fin & (x > hi))
    eq = fin & (x >= lo) & (x <= hi)
    if not done:  # not settled: bisection on the keys of [lo, hi] (keep the krem largest)
        klo = (lo.to(tl.int32, bitcast=True)).to(tl.int64)
        khi = (hi.to(tl.int32, bitcast=True)).to(tl.int64)
        klo = tl.where(klo >= 0, klo, klo ^ 0x7FFFFFFF)
        khi = tl.where(khi >= 0, khi, khi ^ 0x7FFFFFFF)
        k64 = key.to(tl.int64)
        for it in range(32):
            mid = klo + (khi - klo + 1) // 2
            ok = tl.sum((eq & (k64 >= mid)).to(tl.int32), 0) >= krem
            klo = tl.where(ok, mid, klo)
            khi = tl.where(ok, khi, mid - 1)
        gt = gt | (eq & (k64 > klo))
        eq = eq & (k64 == klo)
    return gt, eq


@triton.jit
def ukey_top(x, PRE: tl.constexpr):
    """The top PRE bits of the radix searches' unsigned key of float32 x (the first digit of :func:`_search`
    with a counted first digit)."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return ((key.to(tl.int64) + 2147483648) >> (32 - PRE)).to(tl.int32)


@triton.jit
def _search(x, offs, K, RADIX: tl.constexpr, HIST=None, PRE: tl.constexpr = 0, NPAD=0):
    """(gt, eq): the finite entries of x above / at the K-th largest one (``eq`` may hold more
    entries than are kept: ties, all of the same value), by the search RADIX: 0 bisection, 1 radix (8-bit
    digits), 2 value ranges, 3 / 5 radix with 4- / 5-bit digits (module docstring).

    Radix searches with PRE > 0: the histogram of the first PRE bits of every entry's key (:func:`ukey_top`)
    was counted beforehand, at HIST (2**PRE int32 counts, of all entries but NPAD -inf ones): the search takes
    its first digit from it and continues with RADIX's digits below (two 5-bit passes fewer for PRE = 10)."""
    valid = x > float("-inf")
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32, ordered like x
    if RADIX == 2:
        gt, eq = _range_search(x, key, valid, K, 64, 8)
    elif RADIX == 1 or RADIX == 3 or RADIX == 5:
        # radix select on the unsigned image of the key, W bits per pass (8: up to 4 histogram passes of 256
        # bins; 4 / 5: up to 8 / 7 passes of 16 / 32 bins, each far cheaper), fewer when the bin holding the
        # k-th largest is kept whole (then the threshold needs no more bits)
        W: tl.constexpr = 8 if RADIX == 1 else 4 if RADIX == 3 else 5
        NBINS: tl.constexpr = 1 << W
        NPASS: tl.constexpr = (32 - PRE + W - 1) // W
        ukey = key.to(tl.int64) + 2147483648
        bins = tl.arange(0, NBINS)
        zero = tl.min(offs, 0) * 0
        prefix = zero.to(tl.int64)
        krem = K + zero
        done = zero
        cut = zero.to(tl.int64)  # the threshold is prefix >> cut, compared with ukey >> cut
        if PRE > 0:  # the first digit from the counted histogram, plus the NPAD -inf entries in -inf's bin
            b1 = tl.arange(0, 1 << PRE)
            NEG_INF_BIN: tl.constexpr = 0x7FFFFF >> (32 - PRE)  # ukey_top(-inf): key 0x807FFFFF + 2**31
            h1 = tl.load(HIST + b1, cache_modifier=".cg") + tl.where(b1 == NEG_INF_BIN, NPAD, 0)
            ge1 = tl.sum(h1, 0) - tl.cumsum(h1, 0) + h1
            d1 = tl.maximum(tl.max(tl.where(ge1 >= krem, b1, -1), 0), 0)
            krem = krem - tl.sum(tl.where(b1 > d1, h1, 0), 0)
            in1 = tl.sum(tl.where(b1 == d1, h1, 0), 0)
            prefix = d1.to(tl.int64) << (32 - PRE)
            cut = zero.to(tl.int64) + (32 - PRE)
            done = (in1 == krem).to(tl.int32)
        for p in tl.static_range(NPASS):
            if done == 0:
                top: tl.constexpr = 32 - PRE - W * p  # bits >= top are decided
                width: tl.constexpr = W if W < top else top  # the last digit may be narrower (5 bits: 2)
                shift: tl.constexpr = top - width
                match = (ukey >> top) == (prefix >> top)
                digit = ((ukey >> shift) & ((1 << width) - 1)).to(tl.int32)
                hist = tl.histogram(digit, NBINS, mask=match)
                cum = tl.cumsum(hist, 0)
                ge = tl.sum(hist, 0) - cum + hist  # matching entries with digit >= bin
                d_sel = tl.maximum(tl.max(tl.where(ge >= krem, bins, -1), 0), 0)
                krem = krem - tl.sum(tl.where(bins > d_sel, hist, 0), 0)
                in_bin = tl.sum(tl.where(bins == d_sel, hist, 0), 0)
                prefix = prefix | (d_sel.to(tl.int64) << shift)
                cut = zero.to(tl.int64) + shift
                done = (in_bin == krem).to(tl.int32)
        ku = ukey >> cut
        kt = prefix >> cut
        gt = (ku > kt) & valid
        eq = (ku == kt) & valid
    else:
        # bisection on the key: 32 counting passes
        k64 = key.to(tl.int64)
        lo = tl.min(k64, 0)
        hi = tl.max(k64, 0)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            c = tl.sum((k64 >= mid).to(tl.int32), 0)
            ok = c >= K
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        gt = (k64 > lo) & valid
        eq = (k64 == lo) & valid
    return gt, eq


@triton.jit
def _keep_mask(gt, eq, K):
    """The kept entries: all of ``gt``, then those of ``eq`` (ties) in ascending position up to K in all."""
    # both counts in one reduction (rows hold at most 2**16 entries)
    counts = tl.sum(gt.to(tl.int32) * 65536 + eq.to(tl.int32), 0)
    need = K - (counts >> 16)  # how many entries equal to the threshold are kept
    keep = gt | eq
    if (counts & 0xFFFF) > need:  # ties at the threshold: the lowest columns
        keep = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))
    return keep


@triton.jit
def _select_core(x, offs, K, OUT_ROW, val, BLOCK: tl.constexpr, KP: tl.constexpr, RADIX: tl.constexpr,
                 OUT_X, STORE_X: tl.constexpr, HIST=None, PRE: tl.constexpr = 0, NPAD=0):
    """Store at OUT_ROW[0:K] the ``val`` of the K largest finite entries of x (ascending offs), -1 padded
    (with STORE_X also their scores at OUT_X[0:K], -inf padded). RADIX: the search (:func:`_search`);
    HIST / PRE / NPAD: a counted first digit (:func:`_search`)."""
    gt, eq = _search(x, offs, K, RADIX, HIST, PRE, NPAD)
    keep = _keep_mask(gt, eq, K)
    keep_i = keep.to(tl.int32)
    dest = tl.cumsum(keep_i, 0) - 1
    tl.store(OUT_ROW + dest, val.to(tl.int32), mask=keep)
    nkeep = tl.sum(keep_i, 0)
    pad = nkeep + tl.arange(0, KP)
    tl.store(OUT_ROW + pad, tl.full([KP], -1, tl.int32), mask=pad < K)
    if STORE_X:
        tl.store(OUT_X + dest, x, mask=keep)
        tl.store(OUT_X + pad, tl.full([KP], float("-inf"), tl.float32), mask=pad < K)


@triton.jit
def _select_holes(x, offs, K, OUT_ROW, val, RADIX: tl.constexpr, HIST=None, PRE: tl.constexpr = 0, NPAD=0):
    """The K largest finite entries of x without compaction: OUT_ROW[j] = val[j] where entry j is kept, -1
    where not (no prefix sum, and one coalesced store; for consumers to which the order does not matter).
    HIST / PRE / NPAD: a counted first digit (:func:`_search`)."""
    gt, eq = _search(x, offs, K, RADIX, HIST, PRE, NPAD)
    keep = _keep_mask(gt, eq, K)
    tl.store(OUT_ROW + offs, tl.where(keep, val, -1).to(tl.int32))


@triton.jit(do_not_specialize=["N", "pos0", "L_inner", "nvis_bs", "inner0"])
def _select_kernel(
    S, stride_s, N, K, OUT, stride_o,
    MAP, stride_map, map_bs,
    pos0, pos_step, L_inner, nvis_bs, POS_BASE, inner0,
    BLOCK: tl.constexpr, KP: tl.constexpr, HAS_NVIS: tl.constexpr, HAS_MAP: tl.constexpr,
    RADIX: tl.constexpr, HAS_POS_BASE: tl.constexpr, INNER_GRID: tl.constexpr = False,
):
    if INNER_GRID:  # grid (inner rows inner0 ..., outer): a band of rows whose visible widths fit BLOCK
        row = tl.program_id(1).to(tl.int64) * L_inner + inner0 + tl.program_id(0)
    else:
        row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x = tl.load(S + row * stride_s + offs, mask=offs < N, other=float("-inf"))
    if HAS_NVIS:
        # row = outer * L_inner + inner; its query/tile sits at pos0 + inner * pos_step
        pos = pos0 + (row % L_inner) * pos_step
        if HAS_POS_BASE:  # positions relative to a length held in device memory (CUDA-graph decode)
            pos += tl.load(POS_BASE).to(tl.int64)
        nvis = pos // nvis_bs + 1
        x = tl.where(offs < nvis, x, float("-inf"))
        x = tl.where((offs == 0) | (offs == nvis - 1), float("inf"), x)
    if HAS_MAP:
        blk = tl.load(MAP + row * stride_map + offs // map_bs, mask=offs < N, other=0)
        val = blk * map_bs + offs % map_bs
    else:
        val = offs
    _select_core(x, offs, K, OUT + row * stride_o, val, BLOCK, KP, RADIX, OUT, False)


BAND_MIN_WIDTH = 256  # rows whose visible columns fit in fewer than this share the narrowest band


def _width_bands(n: int, nvis):
    """With per-row visibility growing along the inner row index (prefill: tile or query t sees
    (pos0 + t * pos_step) // bs + 1 columns), the inner rows split into bands by the power of two holding
    their visible width: [(first inner row, end, width)], or None when one launch at the full width is as
    good (selection cost grows with the width a program holds)."""
    if nvis is None:
        return None
    pos0, pos_step, L_inner, bs = nvis
    full = max(16, triton.next_power_of_2(n))
    if pos_step <= 0 or L_inner < 2 or full <= BAND_MIN_WIDTH:
        return None
    bands, i0 = [], 0
    while i0 < L_inner:
        w0 = min(n, (pos0 + i0 * pos_step) // bs + 1)
        width = max(BAND_MIN_WIDTH, triton.next_power_of_2(max(w0, 1)))
        if width >= full:
            bands.append((i0, L_inner, full))
            break
        # rows up to the last whose visible width still fits: (pos0 + i * pos_step) // bs + 1 <= width
        i1 = min(L_inner, max(i0 + 1, (width * bs - 1 - pos0) // pos_step + 1))
        bands.append((i0, i1, width))
        i0 = i1
    if len(bands) == 1:
        return None
    return bands


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def topk_select(
    scores: torch.Tensor,
    k: int,
    *,
    n: int | None = None,
    nvis: tuple[int, int, int, int] | None = None,
    block_map: torch.Tensor | None = None,
    map_bs: int = 1,
    method: int | None = None,
    pos_base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices [R, k] int32 (ascending, -1 padded) of the k largest finite entries of each row of
    ``scores`` [R, >=n] float32 (only the first ``n`` columns compete).

    ``nvis=(pos0, pos_step, L_inner, bs)``: row r sees columns < (pos0 + (r % L_inner) * pos_step) // bs + 1
    and its first and last visible columns are always kept. ``block_map`` [R, >= n / map_bs] int32:
    return ``block_map[r, j // map_bs] * map_bs + j % map_bs`` instead of the column j.
    ``pos_base``: a one-element int tensor on the device added to ``pos0`` inside the kernel (the host never
    reads it, so the call can be captured in a CUDA graph).
    """
    R = scores.shape[0]
    n = scores.shape[1] if n is None else n
    out = torch.empty(R, k, dtype=torch.int32, device=scores.device)
    if R == 0:
        return out
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    block = max(16, triton.next_power_of_2(n))
    if block > MAX_SELECT_WIDTH:
        if pos_base is not None:
            raise ValueError(f"rows wider than {MAX_SELECT_WIDTH} columns need a host-side position")
        return _topk_select_torch(scores[:, :n], k, nvis, block_map, map_bs)
    pos0, pos_step, L_inner, nbs = nvis if nvis is not None else (0, 0, 1, 1)
    has_map = block_map is not None
    mp = block_map if has_map else out
    args = (scores, scores.stride(0), n, k, out, out.stride(0), mp, mp.stride(0), map_bs,
            pos0, pos_step, L_inner, nbs, pos_base if pos_base is not None else out)
    meta = dict(KP=max(16, triton.next_power_of_2(k)), HAS_NVIS=nvis is not None, HAS_MAP=has_map,
                RADIX=SELECT_METHOD if method is None else method, HAS_POS_BASE=pos_base is not None)
    bands = _width_bands(n, nvis) if pos_base is None and R % L_inner == 0 else None
    if bands is None:
        _select_kernel[(R,)](*args, 0, BLOCK=block, num_warps=_warps(block), **meta)
        return out
    for i0, i1, width in bands:  # rows that see fewer columns run in narrower programs
        _select_kernel[(i1 - i0, R // L_inner)](*args, i0, BLOCK=width, num_warps=_warps(width), INNER_GRID=True,
                                               **meta)
    return out


def _topk_select_torch(scores, k, nvis, block_map, map_bs):
    """Same contract as :func:`topk_select` with torch.topk (very wide rows only)."""
    R, n = scores.shape
    x = scores.float().clone()
    cols = torch.arange(n, device=x.device)
    if nvis is not None:
        pos0, pos_step, L_inner, nbs = nvis
        rows = torch.arange(R, device=x.device)
        nv = (pos0 + (rows % L_inner) * pos_step) // nbs + 1
        x = x.masked_fill(cols[None, :] >= nv[:, None], float("-inf"))
        forced = (cols[None, :] == 0) | (cols[None, :] == (nv - 1)[:, None])
        x = x.masked_fill(forced, float("inf"))
    kk = min(k, n)
    vals, idx = x.topk(kk, dim=1)
    idx = idx.masked_fill(vals == float("-inf"), n)
    idx = idx.sort(dim=1).values
    valid = idx < n
    if block_map is not None:
        safe = idx.clamp(max=n - 1)
        idx = block_map.gather(1, (safe // map_bs).long()).long() * map_bs + safe % map_bs
    out = torch.full((R, k), -1, dtype=torch.int32, device=x.device)
    out[:, :kk] = torch.where(valid, idx, torch.full_like(idx, -1)).to(torch.int32)
    return out
