"""Forward kernels and their launchers: the grouped 3x3 convolution as an implicit GEMM with three
epilogues, the merge of the batch statistics, and the normalise + ReLU pass.

The convolution tiles BLOCK_M output pixels (n, h, w flattened) by BLOCK_N output channels and loops
over the 9 taps and the input channels of the groups the tile covers (see config.py for the packing of
small groups). Its epilogues:

* folded (inference): ``relu(y * scale + shift)`` -- one kernel, x read once, z written once;
* statistics (training): writes y and, per (row tile, channel), the tile's mean and its sum of squared
  deviations from that mean, which a second kernel merges in a fixed order (Chan et al.'s parallel
  variance; for a large batch first in segments, then across them) into the batch mean and biased
  variance. Deviations are taken around each tile's own mean
  (kept as a rounded shift plus an exact offset), so the variance stays accurate when |mean| >> std,
  where E[y^2] - E[y]^2 in fp32 would lose every digit;
* plain: writes y only (backward of the folded path, which recomputes y rather than keeping it).

Training writes y and re-reads it for normalisation instead of recomputing the convolution in a second
pass. Counting bytes in units of one activation E (x, y, z, dz, dx the same size at stride 1):
writing y costs x + y forward, y + z to normalise (4E), and backward then reads dz + y for its
reductions, dz + y and writes dx in dgrad, and x + dz + y in wgrad (8E): 12E in all. Recomputing saves
the y round trip forward (x for the statistics, then x + z: 3E), but backward needs y wherever it reads
dz -- in the reductions, and in the prologues of dgrad and wgrad, where every dy tile would need a full
convolution of x over its halo. Reading x in place of y there (7E) makes 10E in all: 2E (17%) fewer
bytes, bought with the convolution run four times more (its block-diagonal tensor-core waste
included) and a convolution nested inside dgrad's transposed one.
Saving z and inverting the affine instead breaks where ReLU clipped or gamma = 0. Writing y is within
3E of the floor (9E, bench/shapes.op_bytes), keeps every kernel a single pass, and y is what autograd
saves (z is not kept).
"""

import contextlib

import torch
import triton
import triton.language as tl

from ..outputs import accumulate_dtype, conv_output, stats_buffer
from . import config

_CONV_CONFIGS = config.autotune_configs("BLOCK_M", [(128, 4, 3), (64, 4, 3), (128, 8, 3), (256, 8, 2), (64, 4, 1)])
_STATS_BLOCK_T = 32
_STATS_BLOCK_C = 32
# Up to this many row tiles are merged by one program per channel block; beyond, by about
# _STATS_SEGMENTS programs per channel block and then once more.
_STATS_MIN_TILES_PER_PROGRAM = 64
_STATS_SEGMENTS = 64
_ELEMENTWISE_BLOCK = 4096


@triton.autotune(configs=_CONV_CONFIGS, key=config.AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["SIZE_CLASS"])
def _conv_kernel(
    x_ptr, w_ptr, out_ptr, scale_ptr, shift_ptr, part_ptr,
    M, H, W, HO, WO, C_IN, C_OUT, GROUP_IN, GROUP_OUT, PART_ROWS,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, son, soc, soh, sow, SIZE_CLASS,
    STRIDE: tl.constexpr, DIL: tl.constexpr, FOLD_BN: tl.constexpr, STATS: tl.constexpr,
    ACC: tl.constexpr, DOT_IN: tl.constexpr, PRECISION: tl.constexpr, K_ALIGN: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n_img = offs_m // (HO * WO)
    ho = (offs_m % (HO * WO)) // WO
    wo = offs_m % WO
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_OUT
    group_n = offs_n // GROUP_OUT
    # The input channels of the groups this tile's output channels belong to.
    k_lo = tl.multiple_of((n0 // GROUP_OUT) * GROUP_IN, K_ALIGN)
    k_hi = ((tl.minimum(n0 + BLOCK_N, C_OUT) - 1) // GROUP_OUT + 1) * GROUP_IN

    x_img = x_ptr + n_img * sxn
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    # One flat loop over (tap, K chunk) rather than nested loops: a single pipelined loop, which also
    # overlaps the taps when the groups' channels fit one K chunk (the packed case).
    k_steps = tl.cdiv(k_hi - k_lo, BLOCK_K)
    for step in range(0, 9 * k_steps):
        tap = step // k_steps
        kh = tap // 3
        kw = tap % 3
        offs_k = k_lo + (step - tap * k_steps) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = config.k_mask(offs_k, k_hi, EVEN_K)
        hi = ho * STRIDE + (kh - 1) * DIL
        wi = wo * STRIDE + (kw - 1) * DIL
        pix_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        a = tl.load(x_img[:, None] + (hi * sxh + wi * sxw)[:, None] + offs_k.to(tl.int64)[None, :] * sxc,
                    mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        # Block-diagonal weight tile: input channel k feeds output channel n only within a group.
        ci = offs_k[:, None] - group_n[None, :] * GROUP_IN
        w_ok = (ci >= 0) & (ci < GROUP_IN) & k_ok[:, None] & n_ok[None, :]
        w_offsets = config.weight_offsets(offs_n[None, :], ci, kh, kw, swo, swi, swh, sww)
        b = tl.load(w_ptr + w_offsets, mask=w_ok, other=0.0)
        acc = tl.dot(a.to(DOT_IN), b.to(DOT_IN), acc, input_precision=PRECISION, out_dtype=ACC)
    if config.has_non_finite(acc):
        acc = _conv_tile_exact(x_img, w_ptr, ho, wo, m_ok, offs_n, n_ok, group_n, k_lo, k_hi, H, W,
                               sxc, sxh, sxw, swo, swi, swh, sww, GROUP_IN, STRIDE, DIL, ACC, BLOCK_M, BLOCK_N)

    # y is rounded to the input dtype in every epilogue, as an unfused conv would store it; backward
    # recomputes the ReLU mask from that rounded y, so it matches the forward's exactly.
    y = config.cast(acc, out_ptr.dtype.element_ty)
    ok = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + (n_img * son + ho * soh + wo * sow)[:, None] + offs_n.to(tl.int64)[None, :] * soc
    if FOLD_BN:
        scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)
        shift = tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)
        v = y.to(ACC) * scale[None, :] + shift[None, :]
        # where(v < 0) rather than maximum: ReLU must pass NaN through, as torch.relu does.
        tl.store(out_ptrs, config.cast(tl.where(v < 0, 0.0, v), out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out_ptrs, y, mask=ok)
        if STATS:
            count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC)
            tile_shift, offset, m2 = tile_moments(tl.where(ok, y.to(ACC), 0.0), ok, count)
            part = part_ptr + pid_m * C_OUT + offs_n
            tl.store(part, tile_shift, mask=n_ok)
            tl.store(part + PART_ROWS * C_OUT, offset, mask=n_ok)
            tl.store(part + 2 * PART_ROWS * C_OUT, m2, mask=n_ok)


@triton.jit
def tile_moments(v, ok, count):
    """Per channel of a [pixels, channels] tile ``v`` (zero outside ``ok``, ``count`` pixels inside): a
    shift near the tile's mean (its rounded mean), the mean of the deviations from it, and their sum of
    squares. v - shift is exact when |mean| >> spread, and the tile mean lives on as shift + offset
    without being rounded at |mean|'s magnitude."""
    tile_shift = tl.sum(v, axis=0) / count
    dev = tl.where(ok, v - tile_shift[None, :], 0.0)
    offset = tl.sum(dev, axis=0) / count
    dev = tl.where(ok, dev - offset[None, :], 0.0)
    return tile_shift, offset, tl.sum(dev * dev, axis=0)


@triton.jit
def _conv_tile_exact(x_img, w_ptr, ho, wo, m_ok, offs_n, n_ok, group_n, k_lo, k_hi, H, W,
                     sxc, sxh, sxw, swo, swi, swh, sww, GROUP_IN, STRIDE: tl.constexpr, DIL: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The convolution tile as a sum of in-group products only, one input channel at a time: where a
    non-finite input would leak through the packed tile's zero weights (see config.py)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for tap in range(9):
        kh = tap // 3
        kw = tap % 3
        hi = ho * STRIDE + (kh - 1) * DIL
        wi = wo * STRIDE + (kw - 1) * DIL
        pix_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        for k in range(k_lo, k_hi):
            xk = tl.load(x_img + hi * sxh + wi * sxw + tl.cast(k, tl.int64) * sxc, mask=pix_ok, other=0.0).to(ACC)
            ci = k - group_n * GROUP_IN
            w_ok = (ci >= 0) & (ci < GROUP_IN) & n_ok
            w_offsets = config.weight_offsets(offs_n, ci, kh, kw, swo, swi, swh, sww)
            wk = tl.load(w_ptr + w_offsets, mask=w_ok, other=0.0).to(ACC)
            acc += tl.where(w_ok[None, :], xk[:, None] * wk[None, :], 0.0)
    return acc


@triton.jit
def _stats_kernel(
    part_ptr, out_ptr, gamma_ptr, beta_ptr, M, C, TILES, TILE_M, TILES_PER_PROGRAM, PART_ROWS, OUT_ROWS,
    eps_high, eps_low, FINAL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merges the (shift, offset, m2) partials of row tiles [t_lo, t_hi), each TILE_M pixels but the
    last. FINAL: into the statistics rows; else into one partial of the same form at row program_id(1),
    for a second merge over segments (so that a large batch is merged by many programs)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    t_lo = tl.program_id(1).to(tl.int64) * TILES_PER_PROGRAM
    t_hi = tl.minimum(t_lo + TILES_PER_PROGRAM, TILES)
    # Tile means are merged relative to the first tile's shift, so their differences keep full precision.
    base = tl.load(part_ptr + t_lo * C + offs_c, mask=c_ok, other=0.0)
    count = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    # Chan's merge, one chunk of tiles at a time in a fixed order: deterministic, no atomics.
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_hi
        tile_count = tl.where(t_ok, tl.minimum(M - offs_t * TILE_M, TILE_M), 0).to(ACC)
        ok = t_ok[:, None] & c_ok[None, :]
        part = part_ptr + offs_t[:, None] * C + offs_c[None, :]
        tile_shift = tl.load(part, mask=ok, other=0.0)
        tile_offset = tl.load(part + PART_ROWS * C, mask=ok, other=0.0)
        tile_m2 = tl.load(part + 2 * PART_ROWS * C, mask=ok, other=0.0)
        tile_mean = tl.where(ok, (tile_shift - base[None, :]) + tile_offset, 0.0)
        chunk_count = tl.sum(tile_count, axis=0)
        chunk_mean = tl.sum(tile_count[:, None] * tile_mean, axis=0) / chunk_count
        dev = tl.where(ok, tile_mean - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(tile_m2, axis=0) + tl.sum(tile_count[:, None] * dev * dev, axis=0)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / total)
        m2 += chunk_m2 + delta * delta * (count * chunk_count / total)
        count = total
    if FINAL:
        mean += base
        var = m2 / count
        scale = 1.0 / tl.sqrt(config.add_eps(var, eps_high, eps_low))
        if HAS_GAMMA:
            scale *= tl.load(gamma_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
        shift = -mean * scale
        if HAS_BETA:
            shift += tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
        tl.store(out_ptr + offs_c, mean, mask=c_ok)
        tl.store(out_ptr + C + offs_c, var, mask=c_ok)
        tl.store(out_ptr + 2 * C + offs_c, scale, mask=c_ok)
        tl.store(out_ptr + 3 * C + offs_c, shift, mask=c_ok)
    else:
        out = out_ptr + tl.program_id(1) * C + offs_c
        tl.store(out, base, mask=c_ok)
        tl.store(out + OUT_ROWS * C, mean, mask=c_ok)
        tl.store(out + 2 * OUT_ROWS * C, m2, mask=c_ok)


@triton.jit
def _bn_relu_kernel(y_ptr, r_ptr, z_ptr, scale_ptr, shift_ptr, P, HW, C, s_n, s_c, s_hw,
                    HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # A [pixels, channels] tile of y (the residual) and z, which are dense in the same memory format (h
    # and w merge): per-channel values load once per tile and indices divide once per pixel, not per
    # element.
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    ok = (offs_p < P)[:, None] & c_ok[None, :]
    offs = ((offs_p // HW) * s_n + (offs_p % HW) * s_hw)[:, None] + offs_c.to(tl.int64)[None, :] * s_c
    scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    v = tl.load(y_ptr + offs, mask=ok, other=0.0).to(ACC) * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        # The standalone BatchNorm + ReLU: batch_norm's output rounded as an unfused one stores it,
        # then the residual added.
        v = config.cast(v, z_ptr.dtype.element_ty).to(ACC) + tl.load(r_ptr + offs, mask=ok, other=0.0).to(ACC)
    tl.store(z_ptr + offs, config.cast(tl.where(v < 0, 0.0, v), z_ptr.dtype.element_ty), mask=ok)


def normalize_relu(y, residual, z, scale, shift):
    """z = relu(y * scale + shift [+ residual]); y, residual and z dense in one memory format."""
    n, c, h, w = y.shape
    block_c = min(triton.next_power_of_2(c), 64)
    block_p = _ELEMENTWISE_BLOCK // block_c
    _bn_relu_kernel[(triton.cdiv(n * h * w, block_p), triton.cdiv(c, block_c))](
        y, y if residual is None else residual, z, scale, shift, n * h * w, h * w, c, y.stride(0), y.stride(1),
        y.stride(3), HAS_RESIDUAL=residual is not None, ACC=config.tl_acc_dtype(y.dtype), BLOCK_P=block_p,
        BLOCK_C=block_c,
    )


def device_guard(t):
    """Triton launches on the current CUDA device, so make it the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _launch_conv(x, weight, out, stride, dilation, groups, *, scale=None, shift=None, part=None):
    """Launches the convolution; returns the BLOCK_M it ran with."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    _, _, ho, wo = out.shape
    block_n, block_k = config.gemm_channel_tiles(c_out // groups, c_in // groups, groups)
    k_align, even_k = config.k_range_layout(c_out // groups, c_in // groups, c_out, block_n, block_k)
    fold = scale is not None
    stats = part is not None
    # Unused per-channel pointers get a tensor of the accumulation dtype, as the used ones have: the
    # autotuning key holds every tensor's dtype, so all three epilogues share one config per shape,
    # and the folded backward recomputes y in the forward's exact summation order (its ReLU mask is
    # the forward's).
    dummy = torch.empty(1, dtype=accumulate_dtype(x.dtype), device=x.device)
    grid = lambda meta: (triton.cdiv(n * ho * wo, meta["BLOCK_M"]), triton.cdiv(c_out, block_n))  # noqa: E731
    chosen = config.launch_autotuned(
        _conv_kernel, grid,
        x, weight, out, scale if fold else dummy, shift if fold else dummy, part if stats else dummy,
        n * ho * wo, h, w, ho, wo, c_in, c_out, c_in // groups, c_out // groups, part.shape[1] if stats else 0,
        *x.stride(), *weight.stride(), *out.stride(), config.size_class(n * h * w),
        STRIDE=stride, DIL=dilation, FOLD_BN=fold, STATS=stats,
        ACC=config.tl_acc_dtype(x.dtype), DOT_IN=config.dot_operand_dtype(x.dtype),
        PRECISION=config.dot_precision(x.dtype), K_ALIGN=k_align, EVEN_K=even_k, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return chosen.kwargs["BLOCK_M"]


def conv(x, weight, stride, dilation, groups):
    """y = conv2d(x, weight, padding=dilation) in x's dtype and memory format."""
    y = conv_output(x, weight, stride)
    if y.numel():  # an empty batch: nothing to compute, and nothing for the autotuner to time
        with device_guard(x):
            _launch_conv(x, weight, y, stride, dilation, groups)
    return y


def folded_forward(x, weight, scale, shift, stride, dilation, groups):
    """relu(conv(x) * scale + shift) in one kernel."""
    z = conv_output(x, weight, stride)
    if z.numel():  # as in conv
        with device_guard(x):
            _launch_conv(x, weight, z, stride, dilation, groups, scale=scale, shift=shift)
    return z


def merge_stats(part, part_rows, m, tile_m, stats, bn_weight, bn_bias, eps):
    """The statistics rows from the (shift, offset, m2) partials of row tiles of tile_m pixels."""
    c_out = stats.shape[1]
    tiles = triton.cdiv(m, tile_m)
    c_blocks = triton.cdiv(c_out, _STATS_BLOCK_C)
    common = dict(HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None,
                  ACC=config.tl_acc_dtype(stats.dtype), BLOCK_T=_STATS_BLOCK_T, BLOCK_C=_STATS_BLOCK_C)
    gamma = bn_weight if bn_weight is not None else stats
    beta = bn_bias if bn_bias is not None else stats
    per_program = max(_STATS_MIN_TILES_PER_PROGRAM, triton.cdiv(tiles, _STATS_SEGMENTS))
    if tiles > per_program:
        # Many tiles: merge segments of them in parallel first, then the segments.
        segments = triton.cdiv(tiles, per_program)
        merged = torch.empty((3, segments, c_out), dtype=stats.dtype, device=stats.device)
        _stats_kernel[(c_blocks, segments)](
            part, merged, gamma, beta, m, c_out, tiles, tile_m, per_program, part_rows, segments,
            *config.eps_arguments(eps), FINAL=False, **common,
        )
        part, part_rows, tiles, tile_m = merged, segments, segments, tile_m * per_program
    _stats_kernel[(c_blocks, 1)](
        part, stats, gamma, beta, m, c_out, tiles, tile_m, tiles, part_rows, 0, *config.eps_arguments(eps),
        FINAL=True, **common,
    )


def train_forward(x, weight, bn_weight, bn_bias, eps, stride, dilation, groups):
    """(z, y, stats): the output, the saved conv output, and outputs.stats_buffer's rows."""
    y = conv_output(x, weight, stride)
    n, c_out, ho, wo = y.shape
    m = n * ho * wo
    # Room for the row tiles of the smallest BLOCK_M that autotuning may pick.
    part_rows = triton.cdiv(m, min(c.kwargs["BLOCK_M"] for c in _CONV_CONFIGS))
    part = torch.empty((3, part_rows, c_out), dtype=accumulate_dtype(x.dtype), device=x.device)
    stats = stats_buffer(x, c_out)
    z = torch.empty_like(y)
    with device_guard(x):
        block_m = _launch_conv(x, weight, y, stride, dilation, groups, part=part)
        merge_stats(part, part_rows, m, block_m, stats, bn_weight, bn_bias, eps)
        normalize_relu(y, None, z, stats[2], stats[3])
    return z, y, stats
