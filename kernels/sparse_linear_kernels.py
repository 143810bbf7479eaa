"""Triton kernels of the wina sparse linear  y = W (x * m) + b.

Layouts shared by every kernel:

* ``x``      (M, K), row stride ``stride_xm``, unit column stride; fp16, bf16 or fp32.
* ``wt``     (K, N), row stride ``stride_wk`` >= N, unit column stride: the weight
             transposed, so input channel i is the contiguous row ``wt[i, :]`` and
             skipping channel i skips one whole row.
* ``score``  (K,) float32; importance_i = |x_i| * score_i computed in float32,
             exactly as ``kernels/reference.py`` does (WINA: column norms; TEAL: ones).
* ``out``    (M, N), row stride ``stride_om``, x's dtype; accumulation is float32.
* split-K:   SPLIT_K programs share an output tile, each summing a range of K, and
             ``REDUCE`` says how their float32 partial sums meet:
             0  each stores its partial in ``part`` (SPLIT_K, M, N); ``_splitk_reduce_kernel``
                sums them in a second launch (fixed order; no zeroed buffer).
             1  each stores its partial, then takes a ticket from ``cnt`` (int32, one per
                output tile); the program drawing the last ticket sums the partials in a
                fixed order (deterministic), adds the bias, casts, stores, and sets its
                ticket back to 0.  One launch.
             2  each adds its partial by atomics into float32 sums (M, N) kept in ``cnt``
                right after the launch's tickets, then takes a ticket; the last program
                swaps the tile's sums out for zeros, adds the bias, casts and stores.  One
                launch, no ``part`` traffic; the float32 summation order varies run to run.
             Modes 1 and 2 leave ``cnt`` (tickets and sums) all zeros as they found them, so a
             zeroed workspace allocated once serves every later launch on the stream (no
             memset per call, which under Inductor is one more kernel).

``PDL`` (the GEMVs, sm_90+; programmatic dependent launch): each program first lets the next
kernel on the stream launch (``_launch_dependents``), then waits until the kernel before it
has completed and its writes are visible (``_wait_for_prior``) before it reads x or writes
anything.  Only a kernel launched with the PDL attribute starts early: Inductor's own under
``config.triton.enable_pdl``, these two under ``wina_fx/early_launch.py``
(``LAUNCHED_EARLY``); launched the usual way both instructions return at once.

Keep rules (``MODE``): 0 keeps importance > threshold (``threshold_linear``); 1 keeps
x != 0, used on an input that ``_prep_kernel`` already masked (``topk_linear``).
"""
from __future__ import annotations

import triton
import triton.language as tl

KEEP_THRESHOLD = 0
KEEP_NONZERO = 1


@triton.jit
def _keep(xf, score, valid, threshold, MODE: tl.constexpr):
    """Keep mask of float32 values xf (..., C) whose channels have the loaded scores ``score``.

    The callers load the score themselves (with mask valid & (MODE == 0)): torch's mutation
    analysis of user kernels counts every pointer passed to a called function whose result
    reaches a store address as written, and Inductor then clones and writes back that
    tensor around each launch (the compaction's scratch store depends on the mask)."""
    if MODE == 0:
        return (tl.abs(xf) * score > threshold) & valid
    else:
        return (xf != 0.0) & valid


@triton.jit
def _store_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS: tl.constexpr):
    """Store columns offs_n < N of the tile (N: the end of the tile's columns)."""
    nmask = offs_n < N
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & nmask[None, :])


@triton.jit
def _finish(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, part_ptr, cnt_ptr, ticket, n_tickets,
            pid_k, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, n_end):
    """Write the (BM, BN) fp32 tile acc, reducing over split-K programs when SPLIT_K > 1.

    Columns at or past n_end are not written (N: the row length of out and part).
    ``REDUCE`` as in the module docstring.  With 2 the float32 accumulators (M, N) follow
    the launch's n_tickets tickets in the cnt buffer: one tensor, not two arguments, since
    under Inductor each mutable argument of a user kernel is cloned and written back, and
    two views of one workspace would cost a copy kernel per launch.  SPLIT_K is a
    constexpr so that the fixup's loads are unrolled and issued together (a run-time loop
    waits one L2 round trip per split)."""
    if SPLIT_K == 1:
        _store_tile(acc, offs_m, offs_n, M, n_end, out_ptr, stride_om, bias_ptr, HAS_BIAS)
    else:
        omask = (offs_m < M)[:, None] & (offs_n < n_end)[None, :]
        if REDUCE == 2:
            part_ptr = (cnt_ptr + n_tickets).to(tl.pointer_type(tl.float32))
        parts = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        if REDUCE == 2:
            tl.atomic_add(parts, acc, mask=omask, sem="relaxed")
        else:
            tl.store(parts + pid_k * M * N, acc, mask=omask)
        if REDUCE != 0:
            tl.debug_barrier()  # every thread's partial is out before the ticket is taken
            if tl.atomic_add(cnt_ptr + ticket, 1, sem="acq_rel") == SPLIT_K - 1:
                if REDUCE == 2:
                    # swap the sums out for zeros (as int32 bits: the interpreter has no float xchg)
                    bits = tl.atomic_xchg(parts.to(tl.pointer_type(tl.int32)), tl.zeros_like(acc).to(tl.int32),
                                          mask=omask, sem="relaxed")
                    total = bits.to(tl.float32, bitcast=True)
                else:
                    total = tl.load(parts, mask=omask, other=0.0, cache_modifier=".cg")
                    for s in tl.static_range(1, SPLIT_K):
                        total += tl.load(parts + s * M * N, mask=omask, other=0.0, cache_modifier=".cg")
                _store_tile(total, offs_m, offs_n, M, n_end, out_ptr, stride_om, bias_ptr, HAS_BIAS)
                tl.atomic_xchg(cnt_ptr + ticket, 0, sem="relaxed")  # ready for the next launch


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om, SPLIT_K: tl.constexpr,
                          SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[m] = sum over s of part[s, m] (fixed order) + bias.  Grid (cdiv(N, BLOCK_N), M).
    The second launch of a split-K GEMV without tickets: no zeroed buffer, no atomics."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, SPLIT_P2)
    mask = (offs_s < SPLIT_K)[:, None] & (offs_n < N)[None, :]
    p = tl.load(part_ptr + offs_s[:, None] * (M * N) + m * N + offs_n[None, :], mask=mask, other=0.0)
    _store_tile(tl.sum(p, axis=0)[None, :], m + tl.arange(0, 1), offs_n, M, N, out_ptr, stride_om, bias_ptr,
                HAS_BIAS)


@triton.jit
def _prep_kernel(
    x_ptr, score_ptr, xm_ptr, cnt_ptr, M, K, n_cnt, stride_xm, threshold, k_keep,
    TOPK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """xm = x * keep, with the keep rule applied outside the GEMM.  Grid (M, cdiv(K, BLOCK_K)).

    Threshold rule (TOPK=False): keep importance > threshold; one chunk per program.
    Top-k rule (TOPK=True, grid (M, 1), BLOCK_K >= K: the row sits in registers): exact
    top-k_keep per token.  The k-th largest importance is found by bisection on its
    order-preserving integer key, most significant bit first (no sort; at most 32
    block reductions, fewer when a prefix already splits the row exactly).  Channels
    strictly above it are kept, then ties at it lowest channel index first until exactly
    k_keep are kept (torch.topk leaves the choice among ties unspecified).  NaN ranks
    above +inf, as in torch.topk.  The programs also zero cnt[0:n_cnt], the split-K
    tickets of the kernel launched next.
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    per = tl.cdiv(n_cnt, n_prog)
    c0 = (row * tl.num_programs(1) + chunk) * per
    for c in range(c0, tl.minimum(c0 + per, n_cnt), 1024):
        offs_c = c + tl.arange(0, 1024)
        tl.store(cnt_ptr + offs_c, tl.zeros([1024], tl.int32), mask=offs_c < tl.minimum(c0 + per, n_cnt))

    offs = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    valid = offs < K
    xv = tl.load(x_ptr + row * stride_xm + offs, mask=valid, other=0.0)
    s = tl.load(score_ptr + offs, mask=valid, other=0.0)
    imp = tl.abs(xv.to(tl.float32)) * s
    if TOPK:
        bits = imp.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed int order == float order
        # t: candidate key + 2**31 as an unsigned bit pattern, built from the top bit down;
        # it ends as the largest t with count(key >= t) >= k_keep, i.e. the k-th key.
        t = tl.full([], 0, tl.int32)
        bit = tl.full([], 31, tl.int32)
        exact = tl.full([], 0, tl.int32)
        while (bit >= 0) & (exact == 0):
            cand = t | (tl.full([], 1, tl.int32) << bit)
            count = tl.sum((valid & (key >= (cand ^ -2147483648))).to(tl.int32), axis=0)
            t = tl.where(count >= k_keep, cand, t)
            exact = (count == k_keep).to(tl.int32)
            bit -= 1
        kth = t ^ -2147483648
        above = valid & (key > kth)
        tie = (valid & (key == kth)).to(tl.int32)
        quota = k_keep - tl.sum(above.to(tl.int32), axis=0)
        keep = above | ((tie != 0) & (tl.cumsum(tie, axis=0) - tie < quota))
    else:
        keep = valid & (imp > threshold)
    tl.store(xm_ptr + row * K + offs, tl.where(keep, xv, tl.zeros_like(xv)), mask=valid)


@triton.jit
def _fma_rows(acc, rows, jmask, x_row, wt_ptr, stride_wk, offs_n, nmask):
    """acc (rows, BLOCK_N) += wt[rows, offs_n] * x[rows] in float32 (the narrow tiles)."""
    w = tl.load(wt_ptr + rows[:, None] * stride_wk + offs_n[None, :], mask=jmask[:, None] & nmask[None, :],
                other=0.0, eviction_policy="evict_first")
    xg = tl.load(x_row + rows, mask=jmask, other=0.0)
    return acc + w.to(tl.float32) * xg.to(tl.float32)[:, None]


@triton.jit
def _gemv_kernel(
    x_ptr, wt_ptr, bias_ptr, score_ptr, out_ptr, part_ptr, cnt_ptr, scr_ptr,
    M, N, K, stride_xm, stride_wk, stride_om, threshold, K_PER_SPLIT, SPLIT_K: tl.constexpr,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_KS: tl.constexpr, STAGES: tl.constexpr,
    END0, END1, THRESHOLD1, THRESHOLD2, GROUPS: tl.constexpr, ENDS_ALIGNED: tl.constexpr,
    expert_ptr, thr_ptr, stride_we, EXPERTS: tl.constexpr, ROW_SUM: tl.constexpr,
    PDL: tl.constexpr, UNPACK: tl.constexpr,
):
    """Sparse GEMV over the kept rows only, one launch.  Grid (cdiv(N, BLOCK_N), SPLIT_K, M).
    Groups of linears (GROUPS, END0, ...) and rows routed to experts (EXPERTS, ...) as in
    _gemv_masked_kernel.

    Program (n, s, m) owns output columns [n BLOCK_N, (n+1) BLOCK_N) of token m and input
    channels [s K_PER_SPLIT, (s+1) K_PER_SPLIT).  It decides the keep mask of its
    channels and writes the kept channel ids, compacted, into its private scratch row
    (scr, int32: 4 bytes per kept channel against 2 BLOCK_N bytes of weight).  Then it
    reads only those rows of wt, BLOCK_R rows x BLOCK_N columns at a time (each row
    segment contiguous), and multiplies-adds in float32: with ROW_SUM in wide tiles whose
    loads go straight into registers a step ahead (_compacted_prefetched; UNPACK as there),
    else in tiles software-pipelined STAGES deep by Triton.  When the whole range is kept
    (dense input) it reads the rows directly, without the scratch.  Dropped channels cost
    no arithmetic and no weight traffic.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    if PDL:  # see the module docstring; every read of x and every store address depends on m
        pid_n += _launch_dependents()
        m += _wait_for_prior()
    x_row = x_ptr + m * stride_xm
    if EXPERTS:  # written out, not called: see _keep on torch's mutation analysis
        e = tl.load(expert_ptr + m).to(tl.int64)
        wt_ptr += e * stride_we
        score_ptr += e * K
        threshold = tl.load(thr_ptr + e)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    scr = scr_ptr + ((m * SPLIT_K + pid_k) * tl.num_programs(0) + pid_n) * K_PER_SPLIT
    col0 = pid_n * BLOCK_N
    n_end = N
    if GROUPS > 1:
        col0, n_end, segment, threshold = _segment(pid_n, col0, N, END0, END1, threshold, THRESHOLD1, THRESHOLD2,
                                                   GROUPS, BLOCK_N)
        score_ptr += segment * K  # here, not in _segment: see _keep on torch's mutation analysis
        if ENDS_ALIGNED:
            col0 = tl.multiple_of(col0, 16)
    n_keep = tl.full([], 0, tl.int32)
    for c in range(k_lo, k_hi, BLOCK_KS):
        offs = c + tl.arange(0, BLOCK_KS)
        valid = offs < k_hi
        score = tl.load(score_ptr + offs, mask=valid & (MODE == 0), other=0.0)
        keep = _keep(tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32), score, valid, threshold,
                     MODE).to(tl.int32)
        tl.store(scr + n_keep + tl.cumsum(keep, axis=0) - 1, offs, mask=keep != 0)
        n_keep += tl.sum(keep, axis=0)
    tl.debug_barrier()  # the scratch row is complete before any thread reads it

    offs_n = col0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < n_end
    if ROW_SUM:
        acc = _compacted_prefetched(scr, n_keep, n_keep == k_hi - k_lo, x_row, wt_ptr, stride_wk, k_lo, col0, n_end,
                                    BLOCK_N, BLOCK_R, UNPACK)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        if n_keep == k_hi - k_lo:  # every channel of the range kept (dense input): no indirection
            for j in tl.range(0, n_keep, BLOCK_R, num_stages=STAGES):
                offs_j = j + tl.arange(0, BLOCK_R)
                acc = _fma_rows(acc, k_lo + offs_j, offs_j < n_keep, x_row, wt_ptr, stride_wk, offs_n, nmask)
        else:
            for j in tl.range(0, n_keep, BLOCK_R, num_stages=STAGES):
                offs_j = j + tl.arange(0, BLOCK_R)
                jmask = offs_j < n_keep
                rows = tl.load(scr + offs_j, mask=jmask, other=0, cache_modifier=".cg")
                acc = _fma_rows(acc, rows, jmask, x_row, wt_ptr, stride_wk, offs_n, nmask)
    _finish(tl.sum(acc, axis=0)[None, :], m + tl.arange(0, 1), offs_n, M, N, out_ptr, stride_om, bias_ptr,
            part_ptr, cnt_ptr, m * tl.num_programs(0) + pid_n, M * tl.num_programs(0), pid_k, SPLIT_K, HAS_BIAS,
            REDUCE, n_end)


@triton.jit
def _gemv_masked_kernel(
    x_ptr, wt_ptr, bias_ptr, score_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_wk, stride_om, threshold, K_PER_SPLIT, SPLIT_K: tl.constexpr,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    END0, END1, THRESHOLD1, THRESHOLD2, GROUPS: tl.constexpr, ENDS_ALIGNED: tl.constexpr,
    expert_ptr, thr_ptr, stride_we, EXPERTS: tl.constexpr, ROW_SUM: tl.constexpr,
    PDL: tl.constexpr, UNPACK: tl.constexpr, TOKENS: tl.constexpr,
):
    """Sparse GEMV by masked loads (TEAL's scheme).  Grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, TOKENS)).

    Program (n, s, m) walks its K range BLOCK_K channels at a time: it loads x and score,
    decides the keep mask and loads the weight rows with that mask, so a dropped row
    issues no memory transaction.  Nothing precedes the first weight load but one load
    of x (no compaction pass); the price is that every BLOCK_K step is issued and
    multiplied whatever its sparsity, which caps the gain at high sparsity.  ROW_SUM: wide,
    short tiles (512+ columns, a few rows; each thread holds every row of its columns and
    sums them itself) whose loads go straight into registers a step ahead
    (_masked_prefetched; UNPACK: a bf16 weight read as int32 column pairs); else narrow
    tiles, (BLOCK_K, BLOCK_N) accumulators software-pipelined STAGES deep by Triton.
    (Measured and dropped: the same with BLOCK_M = 16 tokens on tensor cores, 1.4-3x slower.
    Hand-written double buffering of x and the weight rows measured 1.2-1.5x slower on the
    narrow tiles in session 4; on the wide ones, without Triton's pipelining through shared
    memory, it is what halved the instructions per weight element in session 16.)

    GROUPS = 2 or 3: wt holds the transposed weights of linears sharing x side by side,
    columns [0, END0), [END0, END1), [END1, N) (GROUPS = 2: END1 = N); score_ptr holds
    their (GROUPS, K) score rows and threshold, THRESHOLD1, THRESHOLD2 their thresholds.
    The column tiles are counted per linear, so each program owns columns of one linear
    and applies that linear's keep rule: one launch for q/k/v or gate/up.  ENDS_ALIGNED:
    END0 and END1 are multiples of 16.

    EXPERTS: row m of x is routed to expert e = expert[m] of a 3-D weight: wt, score and
    threshold are expert e's (wt + e * stride_we, score + e * K, thr[e]); one launch for
    every routed row of a mixture-of-experts op.

    TOKENS = 2 (ROW_SUM, no EXPERTS): program m multiplies tokens 2m and 2m + 1 (two sequences
    decoding together); it loads a weight row when either token keeps it, once, and each
    token multiplies only the channels its own rule keeps.
    """
    tl.static_assert(TOKENS == 1 or (TOKENS == 2 and ROW_SUM and not EXPERTS))
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    if PDL:  # see the module docstring; every read of x and every store address depends on m
        pid_n += _launch_dependents()
        m += _wait_for_prior()
    x_row = x_ptr + m * TOKENS * stride_xm
    if EXPERTS:  # written out, not called: see _keep on torch's mutation analysis
        e = tl.load(expert_ptr + m).to(tl.int64)
        wt_ptr += e * stride_we
        score_ptr += e * K
        threshold = tl.load(thr_ptr + e)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    col0 = pid_n * BLOCK_N
    n_end = N
    if GROUPS > 1:
        col0, n_end, segment, threshold = _segment(pid_n, col0, N, END0, END1, threshold, THRESHOLD1, THRESHOLD2,
                                                   GROUPS, BLOCK_N)
        score_ptr += segment * K  # here, not in _segment: see _keep on torch's mutation analysis
        if ENDS_ALIGNED:  # tell the compiler, which lost track through _segment, for 16-byte loads
            col0 = tl.multiple_of(col0, 16)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < n_end
    if TOKENS == 2:
        acc = _masked_prefetched_pair(x_row, stride_xm, m * 2 + 1 < M, score_ptr, wt_ptr, stride_wk, k_lo, k_hi,
                                      threshold, col0, n_end, MODE, BLOCK_N, BLOCK_K, UNPACK)
    else:
        if ROW_SUM:
            acc = _masked_prefetched(x_row, score_ptr, wt_ptr, stride_wk, k_lo, k_hi, threshold, col0, n_end, MODE,
                                     BLOCK_N, BLOCK_K, UNPACK)
        else:
            acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
            for c in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
                offs = c + tl.arange(0, BLOCK_K)
                valid = offs < k_hi
                xf = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
                keep = _keep(xf, tl.load(score_ptr + offs, mask=valid & (MODE == 0), other=0.0), valid, threshold,
                             MODE)
                w = tl.load(wt_ptr + offs[:, None] * stride_wk + offs_n[None, :],
                            mask=keep[:, None] & nmask[None, :], other=0.0, eviction_policy="evict_first")
                acc += w.to(tl.float32) * tl.where(keep, xf, 0.0)[:, None]  # where: no dropped NaN
        acc = tl.sum(acc, axis=0)[None, :]
    # n_end: a tile ending inside its linear stores nothing into the next one's columns
    _finish(acc, m * TOKENS + tl.arange(0, TOKENS), offs_n, M, N, out_ptr, stride_om, bias_ptr,
            part_ptr, cnt_ptr, m * tl.num_programs(0) + pid_n, tl.num_programs(2) * tl.num_programs(0), pid_k,
            SPLIT_K, HAS_BIAS, REDUCE, n_end)


@triton.jit
def _row_tile(wt_ptr, rows, rmask, stride_wk, col0, n_end, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
    """wt[rows, col0:col0 + BLOCK_N], zeros in the rows not in rmask and the columns from n_end;
    loaded straight into registers.  UNPACK (bf16): as int32 pairs of adjacent columns,
    (rows, BLOCK_N // 2), which _rows_dot widens by two bit operations (col0, n_end, the
    row stride even)."""
    if UNPACK:
        offs_p = col0 // 2 + tl.arange(0, BLOCK_N // 2)
        return tl.load(wt_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_wk // 2) + offs_p[None, :],
                       mask=rmask[:, None] & (offs_p < n_end // 2)[None, :], other=0)
    else:
        offs_n = col0 + tl.arange(0, BLOCK_N)
        return tl.load(wt_ptr + rows[:, None] * stride_wk + offs_n[None, :],
                       mask=rmask[:, None] & (offs_n < n_end)[None, :], other=0.0)


@triton.jit
def _row_sum_accumulators(BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
    """Zero float32 accumulators of _rows_dot: (1, BLOCK_N) and an unused (1, 1), or with UNPACK
    the even and the odd columns, (1, BLOCK_N // 2) each."""
    return (tl.zeros((1, BLOCK_N // 2 if UNPACK else BLOCK_N), tl.float32),
            tl.zeros((1, BLOCK_N // 2 if UNPACK else 1), tl.float32))


@triton.jit
def _in_column_order(acc_a, acc_b, UNPACK: tl.constexpr):
    """The (1, BLOCK_N) column sums from _rows_dot's accumulators (UNPACK: even and odd interleaved)."""
    if UNPACK:
        return tl.interleave(acc_a, acc_b)
    else:
        return acc_a


@triton.jit
def _rows_dot(acc_a, acc_b, w, xk, UNPACK: tl.constexpr):
    """Column sums of w * xk[:, None] in float32, added to acc_a (1, BLOCK_N), or with UNPACK to the
    even columns' acc_a and the odd columns' acc_b (1, BLOCK_N // 2).  A bf16 is the top half of
    its float32, so the pair word shifted left by 16 is the even column exactly, and with its
    low half cleared the odd one: two integer operations for two values."""
    if UNPACK:
        even = (w << 16).to(tl.float32, bitcast=True)
        odd = (w & -65536).to(tl.float32, bitcast=True)
        return (acc_a + tl.sum(even * xk[:, None], axis=0, keep_dims=True),
                acc_b + tl.sum(odd * xk[:, None], axis=0, keep_dims=True))
    else:
        return acc_a + tl.sum(w.to(tl.float32) * xk[:, None], axis=0, keep_dims=True), acc_b


@triton.jit
def _masked_prefetched(x_row, score_ptr, wt_ptr, stride_wk, k_lo, k_hi, threshold, col0, n_end,
                       MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNPACK: tl.constexpr):
    """The (1, BLOCK_N) float32 column sums of the kept rows of wt[k_lo:k_hi, col0:col0 + BLOCK_N]
    times x, BLOCK_K rows a step, the loads kept in registers ahead of their use: the weight
    rows one step ahead, x and the scores two.  Every load goes straight to registers, with no
    asynchronous copy into shared memory and back (Triton's pipelining), which cost the
    wide tiles about half their instructions (ncu, session 16)."""
    acc_a, acc_b = _row_sum_accumulators(BLOCK_N, UNPACK)
    offs = k_lo + tl.arange(0, BLOCK_K)
    valid = offs < k_hi
    xf = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
    keep = _keep(xf, tl.load(score_ptr + offs, mask=valid & (MODE == 0), other=0.0), valid, threshold, MODE)
    w = _row_tile(wt_ptr, offs, keep, stride_wk, col0, n_end, BLOCK_N, UNPACK)
    xk = tl.where(keep, xf, 0.0)  # carried instead of keep: no predicates saved across the loop; no dropped NaN
    offs += BLOCK_K
    valid = offs < k_hi
    xf_next = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
    score_next = tl.load(score_ptr + offs, mask=valid & (MODE == 0), other=0.0)
    for _ in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        keep_next = _keep(xf_next, score_next, valid, threshold, MODE)
        w_next = _row_tile(wt_ptr, offs, keep_next, stride_wk, col0, n_end, BLOCK_N, UNPACK)
        acc_a, acc_b = _rows_dot(acc_a, acc_b, w, xk, UNPACK)
        xk, w = tl.where(keep_next, xf_next, 0.0), w_next
        offs += BLOCK_K
        valid = offs < k_hi
        xf_next = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
        score_next = tl.load(score_ptr + offs, mask=valid & (MODE == 0), other=0.0)
    return _in_column_order(*_rows_dot(acc_a, acc_b, w, xk, UNPACK), UNPACK)


@triton.jit
def _masked_prefetched_pair(x_row, stride_xm, second, score_ptr, wt_ptr, stride_wk, k_lo, k_hi, threshold, col0,
                            n_end, MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            UNPACK: tl.constexpr):
    """_masked_prefetched for two tokens, x_row and x_row + stride_xm (read only if ``second``):
    the (2, BLOCK_N) float32 column sums.  A step loads the weight rows that either token
    keeps (the union of the two masks), once, into registers a step ahead, and multiplies
    each token's own kept channels (a channel one token drops is a zero in its x, so a NaN
    there stays out)."""
    acc_a, acc_b = _row_sum_accumulators(BLOCK_N, UNPACK)
    acc2_a, acc2_b = _row_sum_accumulators(BLOCK_N, UNPACK)
    offs = k_lo + tl.arange(0, BLOCK_K)
    valid = offs < k_hi
    xf = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
    xf2 = tl.load(x_row + stride_xm + offs, mask=valid & second, other=0.0).to(tl.float32)
    score = tl.load(score_ptr + offs, mask=valid & (MODE == 0), other=0.0)
    keep = _keep(xf, score, valid, threshold, MODE)
    keep2 = _keep(xf2, score, valid & second, threshold, MODE)
    w = _row_tile(wt_ptr, offs, keep | keep2, stride_wk, col0, n_end, BLOCK_N, UNPACK)
    xk, xk2 = tl.where(keep, xf, 0.0), tl.where(keep2, xf2, 0.0)
    offs += BLOCK_K
    valid = offs < k_hi
    xf_next = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
    xf2_next = tl.load(x_row + stride_xm + offs, mask=valid & second, other=0.0).to(tl.float32)
    score_next = tl.load(score_ptr + offs, mask=valid & (MODE == 0), other=0.0)
    for _ in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        keep_next = _keep(xf_next, score_next, valid, threshold, MODE)
        keep2_next = _keep(xf2_next, score_next, valid & second, threshold, MODE)
        w_next = _row_tile(wt_ptr, offs, keep_next | keep2_next, stride_wk, col0, n_end, BLOCK_N, UNPACK)
        acc_a, acc_b = _rows_dot(acc_a, acc_b, w, xk, UNPACK)
        acc2_a, acc2_b = _rows_dot(acc2_a, acc2_b, w, xk2, UNPACK)
        xk, xk2, w = tl.where(keep_next, xf_next, 0.0), tl.where(keep2_next, xf2_next, 0.0), w_next
        offs += BLOCK_K
        valid = offs < k_hi
        xf_next = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
        xf2_next = tl.load(x_row + stride_xm + offs, mask=valid & second, other=0.0).to(tl.float32)
        score_next = tl.load(score_ptr + offs, mask=valid & (MODE == 0), other=0.0)
    first = _in_column_order(*_rows_dot(acc_a, acc_b, w, xk, UNPACK), UNPACK)
    other = _in_column_order(*_rows_dot(acc2_a, acc2_b, w, xk2, UNPACK), UNPACK)
    return tl.where((tl.arange(0, 2) == 0)[:, None], first, other)


@triton.jit
def _kept_rows(scr, offs_j, n_keep, all_kept, k_lo):
    """Row ids and mask of kept channels offs_j of a program's range: read back from its scratch
    row, or, when the whole range is kept, k_lo + offs_j without reading it."""
    jmask = offs_j < n_keep
    rows = tl.load(scr + offs_j, mask=jmask & ~all_kept, other=0, cache_modifier=".cg")
    return tl.where(all_kept, k_lo + offs_j, rows), jmask


@triton.jit
def _compacted_prefetched(scr, n_keep, all_kept, x_row, wt_ptr, stride_wk, k_lo, col0, n_end,
                          BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UNPACK: tl.constexpr):
    """The (1, BLOCK_N) float32 column sums of wt[kept rows, col0:col0 + BLOCK_N] times x[kept rows],
    BLOCK_R kept rows a step, as _masked_prefetched: the weight rows and their x values one
    step ahead in registers, the kept ids two."""
    acc_a, acc_b = _row_sum_accumulators(BLOCK_N, UNPACK)
    offs_j = tl.arange(0, BLOCK_R)
    rows, jmask = _kept_rows(scr, offs_j, n_keep, all_kept, k_lo)
    w = _row_tile(wt_ptr, rows, jmask, stride_wk, col0, n_end, BLOCK_N, UNPACK)
    xk = tl.load(x_row + rows, mask=jmask, other=0.0).to(tl.float32)
    rows_next, jmask_next = _kept_rows(scr, offs_j + BLOCK_R, n_keep, all_kept, k_lo)
    for j in range(BLOCK_R, n_keep, BLOCK_R):
        w_next = _row_tile(wt_ptr, rows_next, jmask_next, stride_wk, col0, n_end, BLOCK_N, UNPACK)
        xk_next = tl.load(x_row + rows_next, mask=jmask_next, other=0.0).to(tl.float32)
        acc_a, acc_b = _rows_dot(acc_a, acc_b, w, xk, UNPACK)
        w, xk = w_next, xk_next
        rows_next, jmask_next = _kept_rows(scr, j + BLOCK_R + offs_j, n_keep, all_kept, k_lo)
    return _in_column_order(*_rows_dot(acc_a, acc_b, w, xk, UNPACK), UNPACK)


@triton.jit
def _launch_dependents():
    """``griddepcontrol.launch_dependents``; returns 0.  Declared pure, with a result the
    caller adds to its program id, because torch's analysis of what a user kernel writes
    gives up on an impure inline asm and then has Inductor clone every tensor argument
    around the launch (``tests/test_kernel_effects.py``); ``tl.extra.cuda.gdc_launch_dependents``
    is impure.  The result keeps the compiler from dropping it."""
    return tl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _wait_for_prior():
    """``griddepcontrol.wait``; returns 0.  Pure for the same reason as _launch_dependents, so
    the compiler may move it: the caller adds the result to the token index m, from which
    every load of x and every store address is computed, and those cannot move above it
    (the score loads, which no kernel writes, may)."""
    return tl.inline_asm_elementwise("griddepcontrol.wait; mov.u32 $0, 0;", "=r", [],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _segment(pid_n, col0, N, END0, END1, threshold, THRESHOLD1, THRESHOLD2,
             GROUPS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first column, end column, linear, threshold) of column tile pid_n when the tiles
    are counted linear by linear (see _gemv_masked_kernel)."""
    tiles0 = tl.cdiv(END0, BLOCK_N)
    in1 = pid_n >= tiles0
    col0 = tl.where(in1, END0 + (pid_n - tiles0) * BLOCK_N, col0)
    n_end = tl.where(in1, END1, END0)
    seg = in1.to(tl.int32)
    threshold = tl.where(in1, THRESHOLD1, threshold)
    if GROUPS > 2:
        tiles1 = tiles0 + tl.cdiv(END1 - END0, BLOCK_N)
        in2 = pid_n >= tiles1
        col0 = tl.where(in2, END1 + (pid_n - tiles1) * BLOCK_N, col0)
        n_end = tl.where(in2, N, n_end)
        seg = tl.where(in2, 2, seg)
        threshold = tl.where(in2, THRESHOLD2, threshold)
    return col0, n_end, seg, threshold


@triton.jit
def _gemv_union_kernel(
    x_ptr, wt_ptr, bias_ptr, score_ptr, out_ptr, part_ptr, cnt_ptr, scr_ptr,
    M, N, K, stride_xm, stride_wk, stride_om, threshold, K_PER_SPLIT, SPLIT_K: tl.constexpr,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KS: tl.constexpr, STAGES: tl.constexpr, IEEE: tl.constexpr,
    END0, END1, THRESHOLD1, THRESHOLD2, GROUPS: tl.constexpr, ENDS_ALIGNED: tl.constexpr, ROW_SUM: tl.constexpr,
):
    """Sparse GEMV of a few tokens (M <= BLOCK_M) over the union of their kept rows, one
    launch.  Grid (cdiv(N, BLOCK_N), SPLIT_K).  Groups as in _gemv_masked_kernel.

    A batch of sequences decoding together can skip only the weight rows that none of its
    tokens keeps.  Program (n, s) owns output columns [n BLOCK_N, (n+1) BLOCK_N) of every
    token and input channels [s K_PER_SPLIT, (s+1) K_PER_SPLIT): it writes the ids of the
    channels some token keeps, compacted, into its scratch row, then reads those rows of
    wt once, BLOCK_R at a time, and multiplies them with the (BLOCK_M, BLOCK_R) tile of the
    tokens' x, each token's own dropped channels set to zero (a tensor-core product; the
    padding rows of BLOCK_M cost arithmetic, not memory).

    ROW_SUM (BLOCK_M of 1 to 8, any power of two; wide, short tiles as in _gemv_kernel): no
    tensor cores; each thread multiplies its columns of the step's rows by every token's x
    and sums the rows in the thread, so no token is padded to 16 (the tensor-core tiles
    measured 0.36-0.70x cuBLAS at 2 tokens on the H200).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    scr = scr_ptr + (pid_k * tl.num_programs(0) + pid_n) * K_PER_SPLIT
    col0 = pid_n * BLOCK_N
    n_end = N
    if GROUPS > 1:
        col0, n_end, segment, threshold = _segment(pid_n, col0, N, END0, END1, threshold, THRESHOLD1, THRESHOLD2,
                                                   GROUPS, BLOCK_N)
        score_ptr += segment * K  # here, not in _segment: see _keep on torch's mutation analysis
        if ENDS_ALIGNED:
            col0 = tl.multiple_of(col0, 16)
    offs_m = tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    n_keep = tl.full([], 0, tl.int32)
    for c in range(k_lo, k_hi, BLOCK_KS):
        offs = c + tl.arange(0, BLOCK_KS)
        valid = offs < k_hi
        score = tl.load(score_ptr + offs, mask=valid & (MODE == 0), other=0.0)
        inb = mmask[:, None] & valid[None, :]
        xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs[None, :], mask=inb, other=0.0)
        kept_by_any = tl.max(_keep(xs.to(tl.float32), score[None, :], inb, threshold, MODE).to(tl.int32), axis=0)
        tl.store(scr + n_keep + tl.cumsum(kept_by_any, axis=0) - 1, offs, mask=kept_by_any != 0)
        n_keep += tl.sum(kept_by_any, axis=0)
    tl.debug_barrier()  # the scratch row is complete before any thread reads it

    offs_n = col0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < n_end
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for j in tl.range(0, n_keep, BLOCK_R, num_stages=STAGES):
        offs_j = j + tl.arange(0, BLOCK_R)
        jmask = offs_j < n_keep
        rows = tl.load(scr + offs_j, mask=jmask, other=0, cache_modifier=".cg")
        w = tl.load(wt_ptr + rows[:, None] * stride_wk + offs_n[None, :], mask=jmask[:, None] & nmask[None, :],
                    other=0.0, eviction_policy="evict_first")
        inb = mmask[:, None] & jmask[None, :]
        xg = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=inb, other=0.0)
        score = tl.load(score_ptr + rows, mask=jmask & (MODE == 0), other=0.0)
        xg = tl.where(_keep(xg.to(tl.float32), score[None, :], inb, threshold, MODE), xg, tl.zeros_like(xg))
        if ROW_SUM:
            acc += tl.sum(xg.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        elif IEEE:
            acc = tl.dot(xg, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(xg, w, acc)
    _finish(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, part_ptr, cnt_ptr, pid_n, tl.num_programs(0),
            pid_k, SPLIT_K, HAS_BIAS, REDUCE, n_end)


@triton.jit
def _gemm_masked_kernel(
    x_ptr, wt_ptr, bias_ptr, score_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_wk, stride_om, threshold, SPLIT_K: tl.constexpr,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """Batched GEMM with the keep mask applied to x in-kernel.  Grid (cdiv(N, BN), cdiv(M, BM), SPLIT_K).

    Per K tile: x tile (BM, BK) -> keep mask -> x * keep -> tensor-core product with
    float32 accumulation (IEEE fp32 for fp32 inputs).  Every weight tile is read (a weight
    load waiting on the x tile's union mask stalled the pipeline: 1.8x slower).  On an
    H100 it took 0.94-8.6x the time of cuBLAS for M = 2..256, so the dispatch does not
    pick it (benchmarks/NOTES.md).
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(k_tiles, SPLIT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for t in range(pid_k * per, tl.minimum(pid_k * per + per, k_tiles)):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        inb = mmask[:, None] & kmask[None, :]
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=inb, other=0.0)
        score = tl.load(score_ptr + offs_k[None, :], mask=inb & (MODE == 0), other=0.0)
        a = tl.where(_keep(a.to(tl.float32), score, inb, threshold, MODE), a, tl.zeros_like(a))
        w = tl.load(wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    _finish(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, part_ptr, cnt_ptr,
            pid_m * tl.num_programs(0) + pid_n, tl.num_programs(0) * tl.num_programs(1), pid_k, SPLIT_K, HAS_BIAS,
            REDUCE, N)


# The kernels that wait for the kernel before them (PDL), so Inductor may launch them early.
LAUNCHED_EARLY = (_gemv_kernel, _gemv_masked_kernel)
