"""Backward kernels and their launcher: BN + ReLU backward folded into grouped dgrad and wgrad.

One formula serves training and inference. With g = dz * 1[not z <= 0], z = relu(y * scale + shift) as
the forward computes and stores it from the saved, rounded y (so the ReLU mask is the forward's
exactly, and NaN passes as in torch.relu's backward),

    dy = scale * g + B * (y - mean) + C

where, training, scale = gamma * rstd, B = -scale * rstd^2 * S2 / n, C = -scale * S1 / n with
S1 = sum(g), S2 = sum(g * (y - mean)) over (N, H_out, W_out) -- this is
gamma * rstd * (g - mean(g) - xhat * mean(g * xhat)), xhat = (y - mean) * rstd, written around the mean
so that no large terms cancel -- and dgamma = rstd * S2, dbeta = S1; inference (BN folded into
scale/shift), B = C = 0, dscale = sum(g * y), dshift = sum(g).

Passes: (1) partial S1, S2 per channel and run of row tiles (a few runs per SM); (2) their sum in a
fixed order, and B, C, and the parameter gradients; (3) dgrad and (4) wgrad, each computing dy on the fly
in its prologue from dz, y and the per-channel coefficients instead of reading a materialised dy;
(5) wgrad's split reduction over N * H_out * W_out summed in a fixed order. No atomics anywhere:
results are bitwise reproducible for a given tile configuration (autotuning picks one per shape class
and process) and device size (which sets the number of splits).
"""

import math

import torch
import triton
import triton.language as tl

from ..outputs import accumulate_dtype, conv_gradients
from . import config
from .conv import device_guard

_DGRAD_CONFIGS = config.autotune_configs("BLOCK_M", [(128, 4, 3), (64, 4, 3), (128, 8, 3), (64, 4, 1)])
_WGRAD_CONFIGS = config.autotune_configs("BLOCK_P", [(64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 2), (64, 4, 1)])
_REDUCE_BLOCK_M = 64 if config.INTERPRET else 128
_REDUCE_BLOCK_C = 32
_FINALIZE_BLOCK_T = 32
_SUM_BLOCK = 1024
# wgrad keeps nine accumulators; 9 x 32 x 32 fp32 still fit in registers, 64 x 64 tiles would spill.
WGRAD_MAX_TILE = 32
# Fewest pixels worth a wgrad split of its own.
_WGRAD_MIN_SPLIT_PIXELS = 64 if config.INTERPRET else 1024


@triton.jit
def _relu_grad(dz, y, scale, shift, STORED: tl.constexpr, MASK: tl.constexpr):
    # As torch.relu's backward, which tests the output as stored: zero where z <= 0, so also where a
    # positive y * scale + shift rounds to zero in STORED (fp16, below 2^-25); a NaN z passes.
    # MASK=False: dz is already masked (the standalone BatchNorm + ReLU with a residual).
    if MASK:
        z = config.cast(y * scale + shift, STORED).to(y.dtype)
        return tl.where(z <= 0, 0.0, dz)
    return dz


@triton.jit
def _dy_tile(dz_ptrs, y_ptrs, ok, offs_c, c_ok, scale_ptr, shift_ptr, mean_ptr, coef_ptr, C,
             TRAIN: tl.constexpr, ACC: tl.constexpr, MASK: tl.constexpr = True):
    """dy on a [pixels, channels] tile, zero outside ``ok``."""
    scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]
    shift = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]
    dz = tl.load(dz_ptrs, mask=ok, other=0.0).to(ACC)
    y = tl.load(y_ptrs, mask=ok, other=0.0).to(ACC)
    dy = _relu_grad(dz, y, scale, shift, y_ptrs.dtype.element_ty, MASK) * scale
    if TRAIN:
        mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
        coef_b = tl.load(coef_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
        coef_c = tl.load(coef_ptr + C + offs_c, mask=c_ok, other=0.0)[None, :]
        dy += coef_b * (y - mean) + coef_c
    return tl.where(ok, dy, 0.0)


@triton.jit
def _reduce_kernel(
    dz_ptr, y_ptr, z_ptr, g_ptr, scale_ptr, shift_ptr, mean_ptr, part_ptr, M, HO, WO, C, TILES_PER_PROGRAM, PART_ROWS,
    sdn, sdc, sdh, sdw, syn, syc, syh, syw, szn, szc, szh, szw, sgn, sgc, sgh, sgw,
    TRAIN: tl.constexpr, MASK: tl.constexpr, OUTPUT_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # OUTPUT_MASK (the standalone op with a residual): g = dz where the output z is not <= 0, written
    # to g_ptr (dz's dtype, bit for bit) for the dx pass and the residual; MASK is then False.
    # Each program sums a run of row tiles into one partial row: few enough rows for the final sum.
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]
    shift = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]
    center = tl.zeros([1, BLOCK_C], ACC)
    if TRAIN:
        center = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    s1 = tl.zeros([BLOCK_C], ACC)
    s2 = tl.zeros([BLOCK_C], ACC)
    p_lo = tl.program_id(0).to(tl.int64) * TILES_PER_PROGRAM * BLOCK_M
    p_hi = tl.minimum(p_lo + TILES_PER_PROGRAM * BLOCK_M, M)
    for p0 in range(p_lo, p_hi, BLOCK_M):
        offs_m = p0 + tl.arange(0, BLOCK_M)
        n_img = offs_m // (HO * WO)
        ho = (offs_m % (HO * WO)) // WO
        wo = offs_m % WO
        ok = (offs_m < p_hi)[:, None] & c_ok[None, :]
        wide_c = offs_c.to(tl.int64)[None, :]  # an NCHW image alone may pass 2^31 elements
        dz = tl.load(dz_ptr + (n_img * sdn + ho * sdh + wo * sdw)[:, None] + wide_c * sdc, mask=ok, other=0.0)
        y = tl.load(y_ptr + (n_img * syn + ho * syh + wo * syw)[:, None] + wide_c * syc, mask=ok, other=0.0)
        y = y.to(ACC)
        if OUTPUT_MASK:
            z = tl.load(z_ptr + (n_img * szn + ho * szh + wo * szw)[:, None] + wide_c * szc, mask=ok, other=0.0)
            dz = tl.where(z <= 0, 0.0, dz).to(dz.dtype)
            tl.store(g_ptr + (n_img * sgn + ho * sgh + wo * sgw)[:, None] + wide_c * sgc, dz, mask=ok)
        g = _relu_grad(dz.to(ACC), y, scale, shift, y_ptr.dtype.element_ty, MASK)
        s1 += tl.sum(g, axis=0)
        s2 += tl.sum(tl.where(ok, g * (y - center), 0.0), axis=0)
    part = part_ptr + tl.program_id(0) * C + offs_c
    tl.store(part, s1, mask=c_ok)
    tl.store(part + PART_ROWS * C, s2, mask=c_ok)


@triton.jit
def _finalize_kernel(
    part_ptr, scale_ptr, var_ptr, coef_ptr, dparam_ptr, M, C, ROWS, eps_high, eps_low,
    TRAIN: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    s1 = tl.zeros([BLOCK_C], ACC)
    s2 = tl.zeros([BLOCK_C], ACC)
    for t0 in range(0, ROWS, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        ok = (offs_t < ROWS)[:, None] & c_ok[None, :]
        part = offs_t[:, None] * C + offs_c[None, :]
        s1 += tl.sum(tl.load(part_ptr + part, mask=ok, other=0.0), axis=0)
        s2 += tl.sum(tl.load(part_ptr + ROWS * C + part, mask=ok, other=0.0), axis=0)
    if TRAIN:
        scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
        rstd = 1.0 / tl.sqrt(config.add_eps(tl.load(var_ptr + offs_c, mask=c_ok, other=0.0), eps_high, eps_low))
        tl.store(coef_ptr + offs_c, -scale * rstd * rstd * s2 / M, mask=c_ok)
        tl.store(coef_ptr + C + offs_c, -scale * s1 / M, mask=c_ok)
        s2 *= rstd
    tl.store(dparam_ptr + offs_c, s2, mask=c_ok)
    tl.store(dparam_ptr + C + offs_c, s1, mask=c_ok)


@triton.jit
def _receiving_taps(phase, STRIDE: tl.constexpr, DIL: tl.constexpr):
    """(first, count, base) along one axis for the input positions phase + STRIDE * a: they receive
    from the taps first + i * TAP_STEP, i < count (see _dgrad_kernel), through output position
    a + base - i * (TAP_STEP * DIL / STRIDE); no other tap reaches them."""
    first = 3
    count = 0
    for tap in tl.static_range(3):
        # phase + DIL * (1 - tap), kept non-negative for the remainder: the interpreter's sign
        # convention for it is not the compiled code's.
        reach = phase + DIL * (1 - tap) + 2 * STRIDE * DIL
        receives = reach % STRIDE == 0
        first = tl.where(receives & (first == 3), tap, first)
        count += receives.to(tl.int32)
    base = (phase + DIL * (1 - first) + 2 * STRIDE * DIL) // STRIDE - 2 * DIL
    return first, count, base


@triton.autotune(configs=_DGRAD_CONFIGS, key=config.AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["SIZE_CLASS"])
def _dgrad_kernel(
    dz_ptr, y_ptr, w_ptr, dx_ptr, scale_ptr, shift_ptr, mean_ptr, coef_ptr,
    N, H, W, HO, WO, C_IN, C_OUT, GROUP_IN, GROUP_OUT, PHASE_COLS,
    sdn, sdc, sdh, sdw, syn, syc, syh, syw, swo, swi, swh, sww, sxn, sxc, sxh, sxw, SIZE_CLASS,
    STRIDE: tl.constexpr, DIL: tl.constexpr, TAP_STEP: tl.constexpr, TRAIN: tl.constexpr,
    ACC: tl.constexpr, DOT_IN: tl.constexpr, PRECISION: tl.constexpr, K_ALIGN: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Implicit GEMM over input pixels x input channels; K runs over the taps and the output channels of
    # the groups this tile's input channels feed. An input row ih receives from tap kh only where
    # ih + DIL * (1 - kh) is a multiple of STRIDE, i.e. by its phase ih % STRIDE: so each program takes
    # the pixels of one phase pair and loops over their taps only -- at stride 2, 2.25 taps per pixel on
    # average instead of 9 mostly masked ones. The taps a phase receives from are TAP_STEP = STRIDE /
    # gcd(STRIDE, DIL) apart. Axis 0 counts (phase pair, pixel tile), phase-major, with as many tiles per
    # phase as phase (0, 0) needs, the largest, over the phase pairs that hold pixels: rows below
    # min(STRIDE, H), columns below PHASE_COLS = min(STRIDE, W) (STRIDE^2 could pass any grid axis).
    phase_tiles = tl.cdiv(tl.cast(N, tl.int64) * ((H + STRIDE - 1) // STRIDE) * ((W + STRIDE - 1) // STRIDE),
                          BLOCK_M)
    phase = tl.program_id(0).to(tl.int64) // phase_tiles
    phase_h = (phase // PHASE_COLS).to(tl.int32)
    phase_w = (phase % PHASE_COLS).to(tl.int32)
    # This phase's rows and columns (H + STRIDE - 1 - phase > 0: the quotients are floors), at least one.
    rows = (H + STRIDE - 1 - phase_h) // STRIDE
    cols = (W + STRIDE - 1 - phase_w) // STRIDE
    offs_m = (tl.program_id(0).to(tl.int64) - phase * phase_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_img = offs_m // tl.maximum(rows * cols, 1)  # int64: the batch may hold more than 2^31 pixels
    m_ok = (n_img < N) & (rows * cols > 0)
    a = (offs_m % tl.maximum(rows * cols, 1)) // tl.maximum(cols, 1)
    b = offs_m % tl.maximum(cols, 1)
    hi = phase_h + STRIDE * a
    wi = phase_w + STRIDE * b
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_IN
    k_lo = tl.multiple_of((n0 // GROUP_IN) * GROUP_OUT, K_ALIGN)
    k_hi = ((tl.minimum(n0 + BLOCK_N, C_IN) - 1) // GROUP_IN + 1) * GROUP_OUT
    first_h, count_h, base_h = _receiving_taps(phase_h, STRIDE, DIL)
    first_w, count_w, base_w = _receiving_taps(phase_w, STRIDE, DIL)
    drop = TAP_STEP * DIL // STRIDE  # output positions between consecutive receiving taps

    dz_img = dz_ptr + n_img * sdn
    y_img = y_ptr + n_img * syn
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    k_steps = tl.cdiv(k_hi - k_lo, BLOCK_K)
    row_steps = tl.maximum(count_w * k_steps, 1)
    for step in range(0, count_h * count_w * k_steps):  # (tap row, tap column, K chunk) flattened
        i_h = step // row_steps
        i_w = (step - i_h * row_steps) // k_steps
        kh = first_h + i_h * TAP_STEP
        kw = first_w + i_w * TAP_STEP
        offs_k = k_lo + (step - i_h * row_steps - i_w * k_steps) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = config.k_mask(offs_k, k_hi, EVEN_K)
        ho = a + (base_h - i_h * drop)
        wo = b + (base_w - i_w * drop)
        pix_ok = m_ok & (ho >= 0) & (ho < HO) & (wo >= 0) & (wo < WO)
        dy = _dy_tile(dz_img[:, None] + (ho * sdh + wo * sdw)[:, None] + offs_k.to(tl.int64)[None, :] * sdc,
                      y_img[:, None] + (ho * syh + wo * syw)[:, None] + offs_k.to(tl.int64)[None, :] * syc,
                      pix_ok[:, None] & k_ok[None, :], offs_k, k_ok, scale_ptr, shift_ptr, mean_ptr,
                      coef_ptr, C_OUT, TRAIN, ACC)
        # dy enters the GEMM in the input dtype, as an unfused backward would store it.
        dy = config.cast(dy, w_ptr.dtype.element_ty).to(DOT_IN)
        ci = offs_n[None, :] - (offs_k[:, None] // GROUP_OUT) * GROUP_IN
        w_ok = (ci >= 0) & (ci < GROUP_IN) & k_ok[:, None] & n_ok[None, :]
        w_offsets = config.weight_offsets(offs_k[:, None], ci, kh, kw, swo, swi, swh, sww)
        b_tile = tl.load(w_ptr + w_offsets, mask=w_ok, other=0.0)
        acc = tl.dot(dy, b_tile.to(DOT_IN), acc, input_precision=PRECISION, out_dtype=ACC)
    if config.has_non_finite(acc):
        acc = _dgrad_tile_exact(dz_img, y_img, w_ptr, scale_ptr, shift_ptr, mean_ptr, coef_ptr, hi, wi, m_ok,
                                offs_n, n_ok, k_lo, k_hi, HO, WO, C_OUT, GROUP_IN, GROUP_OUT,
                                sdc, sdh, sdw, syc, syh, syw, swo, swi, swh, sww,
                                STRIDE, DIL, TRAIN, ACC, BLOCK_M, BLOCK_N)

    dx_ptrs = dx_ptr + (n_img * sxn + hi * sxh + wi * sxw)[:, None] + offs_n.to(tl.int64)[None, :] * sxc
    tl.store(dx_ptrs, config.cast(acc, dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dgrad_tile_exact(dz_img, y_img, w_ptr, scale_ptr, shift_ptr, mean_ptr, coef_ptr, hi, wi, m_ok,
                      offs_n, n_ok, k_lo, k_hi, HO, WO, C_OUT, GROUP_IN, GROUP_OUT,
                      sdc, sdh, sdw, syc, syh, syw, swo, swi, swh, sww,
                      STRIDE: tl.constexpr, DIL: tl.constexpr, TRAIN: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dgrad tile from in-group products only, one output channel at a time (see _conv_tile_exact)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for tap in range(9):
        kh = tap // 3
        kw = tap % 3
        th = hi - (kh - 1) * DIL
        tw = wi - (kw - 1) * DIL
        ho = tl.where(th >= 0, th, 0) // STRIDE
        wo = tl.where(tw >= 0, tw, 0) // STRIDE
        pix_ok = m_ok & (th >= 0) & (th % STRIDE == 0) & (ho < HO) & (tw >= 0) & (tw % STRIDE == 0) & (wo < WO)
        for k in range(k_lo, k_hi):
            offs_k = k + tl.arange(0, 1)
            dy = _dy_tile(dz_img[:, None] + (ho * sdh + wo * sdw)[:, None] + offs_k.to(tl.int64)[None, :] * sdc,
                          y_img[:, None] + (ho * syh + wo * syw)[:, None] + offs_k.to(tl.int64)[None, :] * syc,
                          pix_ok[:, None], offs_k, offs_k < C_OUT, scale_ptr, shift_ptr, mean_ptr, coef_ptr,
                          C_OUT, TRAIN, ACC)
            dy = config.cast(dy, w_ptr.dtype.element_ty).to(ACC)
            ci = offs_n[None, :] - (k // GROUP_OUT) * GROUP_IN
            w_ok = (ci >= 0) & (ci < GROUP_IN) & n_ok[None, :]
            wk = tl.load(w_ptr + config.weight_offsets(k, ci, kh, kw, swo, swi, swh, sww), mask=w_ok, other=0.0).to(ACC)
            acc += tl.where(w_ok, dy * wk, 0.0)
    return acc


@triton.jit
def _wgrad_tap(acc, dy_t, x_pix, hi, wi, p_ok, ci_off, ci_ok, H, W, sxh, sxw,
               DOT_IN: tl.constexpr, PRECISION: tl.constexpr):
    ok = p_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    x = tl.load(x_pix[:, None] + (hi * sxh + wi * sxw)[:, None] + ci_off[None, :],
                mask=ok[:, None] & ci_ok[None, :], other=0.0)
    return tl.dot(dy_t, x.to(DOT_IN), acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.autotune(configs=_WGRAD_CONFIGS, key=config.AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["SIZE_CLASS"])
def _wgrad_kernel(
    x_ptr, dz_ptr, y_ptr, part_ptr, scale_ptr, shift_ptr, mean_ptr, coef_ptr,
    M, H, W, HO, WO, C_IN, C_OUT, GROUP_IN, GROUP_OUT,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, syn, syc, syh, syw, SIZE_CLASS,
    STRIDE: tl.constexpr, DIL: tl.constexpr, TRAIN: tl.constexpr,
    ACC: tl.constexpr, DOT_IN: tl.constexpr, PRECISION: tl.constexpr, K_ALIGN: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # dw[co, ci, tap] = sum over output pixels p of dy[p, co] * x[p shifted by tap, ci]: a GEMM with a
    # long K (the pixels), split over program_id(0). All 9 taps share one dy tile, so dy is computed once
    # per pixel tile and kept in 9 accumulators.
    pid_s = tl.program_id(0)
    co0 = tl.program_id(1) * BLOCK_CO
    offs_co = co0 + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < C_OUT
    ci_lo = tl.multiple_of((co0 // GROUP_OUT) * GROUP_IN, K_ALIGN)
    ci_hi = ((tl.minimum(co0 + BLOCK_CO, C_OUT) - 1) // GROUP_OUT + 1) * GROUP_IN
    offs_ci = ci_lo + tl.program_id(2) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = config.k_mask(offs_ci, ci_hi, EVEN_K)
    ci_off = offs_ci.to(tl.int64) * sxc

    tiles = tl.cdiv(M, BLOCK_P)
    tiles_per_split = tl.cdiv(tiles, tl.num_programs(0))
    p_lo = pid_s.to(tl.int64) * tiles_per_split * BLOCK_P
    p_hi = tl.minimum(p_lo + tiles_per_split * BLOCK_P, M)
    acc0 = tl.zeros([BLOCK_CO, BLOCK_CI], ACC)
    acc1 = tl.zeros([BLOCK_CO, BLOCK_CI], ACC)
    acc2 = tl.zeros([BLOCK_CO, BLOCK_CI], ACC)
    acc3 = tl.zeros([BLOCK_CO, BLOCK_CI], ACC)
    acc4 = tl.zeros([BLOCK_CO, BLOCK_CI], ACC)
    acc5 = tl.zeros([BLOCK_CO, BLOCK_CI], ACC)
    acc6 = tl.zeros([BLOCK_CO, BLOCK_CI], ACC)
    acc7 = tl.zeros([BLOCK_CO, BLOCK_CI], ACC)
    acc8 = tl.zeros([BLOCK_CO, BLOCK_CI], ACC)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < p_hi
        n_img = offs_p // (HO * WO)
        ho = (offs_p % (HO * WO)) // WO
        wo = offs_p % WO
        dy = _dy_tile(dz_ptr + (n_img * sdn + ho * sdh + wo * sdw)[:, None] + offs_co.to(tl.int64)[None, :] * sdc,
                      y_ptr + (n_img * syn + ho * syh + wo * syw)[:, None] + offs_co.to(tl.int64)[None, :] * syc,
                      p_ok[:, None] & co_ok[None, :], offs_co, co_ok, scale_ptr, shift_ptr, mean_ptr,
                      coef_ptr, C_OUT, TRAIN, ACC)
        dy_t = tl.trans(config.cast(dy, x_ptr.dtype.element_ty).to(DOT_IN))
        x_pix = x_ptr + n_img * sxn
        h0 = ho * STRIDE - DIL
        h1 = ho * STRIDE
        h2 = ho * STRIDE + DIL
        w0 = wo * STRIDE - DIL
        w1 = wo * STRIDE
        w2 = wo * STRIDE + DIL
        acc0 = _wgrad_tap(acc0, dy_t, x_pix, h0, w0, p_ok, ci_off, ci_ok, H, W, sxh, sxw, DOT_IN, PRECISION)
        acc1 = _wgrad_tap(acc1, dy_t, x_pix, h0, w1, p_ok, ci_off, ci_ok, H, W, sxh, sxw, DOT_IN, PRECISION)
        acc2 = _wgrad_tap(acc2, dy_t, x_pix, h0, w2, p_ok, ci_off, ci_ok, H, W, sxh, sxw, DOT_IN, PRECISION)
        acc3 = _wgrad_tap(acc3, dy_t, x_pix, h1, w0, p_ok, ci_off, ci_ok, H, W, sxh, sxw, DOT_IN, PRECISION)
        acc4 = _wgrad_tap(acc4, dy_t, x_pix, h1, w1, p_ok, ci_off, ci_ok, H, W, sxh, sxw, DOT_IN, PRECISION)
        acc5 = _wgrad_tap(acc5, dy_t, x_pix, h1, w2, p_ok, ci_off, ci_ok, H, W, sxh, sxw, DOT_IN, PRECISION)
        acc6 = _wgrad_tap(acc6, dy_t, x_pix, h2, w0, p_ok, ci_off, ci_ok, H, W, sxh, sxw, DOT_IN, PRECISION)
        acc7 = _wgrad_tap(acc7, dy_t, x_pix, h2, w1, p_ok, ci_off, ci_ok, H, W, sxh, sxw, DOT_IN, PRECISION)
        acc8 = _wgrad_tap(acc8, dy_t, x_pix, h2, w2, p_ok, ci_off, ci_ok, H, W, sxh, sxw, DOT_IN, PRECISION)

    # Keep the block diagonal: entry (co, ci) is a weight only when both are in the same group.
    ci = offs_ci[None, :] - (offs_co[:, None] // GROUP_OUT) * GROUP_IN
    ok = (ci >= 0) & (ci < GROUP_IN) & co_ok[:, None] & ci_ok[None, :]
    part = part_ptr + pid_s.to(tl.int64) * C_OUT * GROUP_IN * 9 + offs_co[:, None] * (GROUP_IN * 9) + ci * 9
    tl.store(part + 0, acc0, mask=ok)
    tl.store(part + 1, acc1, mask=ok)
    tl.store(part + 2, acc2, mask=ok)
    tl.store(part + 3, acc3, mask=ok)
    tl.store(part + 4, acc4, mask=ok)
    tl.store(part + 5, acc5, mask=ok)
    tl.store(part + 6, acc6, mask=ok)
    tl.store(part + 7, acc7, mask=ok)
    tl.store(part + 8, acc8, mask=ok)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, NUMEL, SPLITS, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    total = tl.zeros([BLOCK], ACC)
    for s in range(SPLITS):
        total += tl.load(part_ptr + s * NUMEL + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, config.cast(total, out_ptr.dtype.element_ty), mask=ok)


def coefficients(dz, y, scale, shift, mean, var, eps, dparams, mask, output=None, g=None):
    """Passes (1) and (2): the coefficients B, C of dy (rows of a (2, C) tensor; unused when folded)
    and, when ``dparams`` is given, the parameter gradients into it. ``mask``: dz is z's gradient and
    g = dz * 1[not z <= 0], z recomputed from y as the forward stores it, or with ``output`` (z itself;
    mask then False) dz * 1[not z <= 0], written into ``g``; otherwise dz is g already. Folded without
    dparams or output nothing runs."""
    n, c, ho, wo = y.shape
    m = n * ho * wo
    train = mean is not None
    acc = accumulate_dtype(y.dtype)
    coef = torch.empty((2, c), dtype=acc, device=y.device)
    if not (train or dparams is not None or output is not None):
        return coef
    c_blocks = triton.cdiv(c, _REDUCE_BLOCK_C)
    row_tiles = triton.cdiv(m, _REDUCE_BLOCK_M)
    tiles_per_program = triton.cdiv(row_tiles, max(1, min(row_tiles, config.parallel_programs(y.device) // c_blocks)))
    rows = triton.cdiv(row_tiles, tiles_per_program)
    part = torch.empty((2, rows, c), dtype=acc, device=y.device)
    sums = dparams if dparams is not None else torch.empty((2, c), dtype=acc, device=y.device)
    tl_acc = config.tl_acc_dtype(y.dtype)
    masked = (output, g) if output is not None else (dz, dz)  # placeholders, never read, without output
    _reduce_kernel[(rows, c_blocks)](
        dz, y, *masked, scale, shift, mean if train else scale, part, m, ho, wo, c, tiles_per_program, rows,
        *dz.stride(), *y.stride(), *masked[0].stride(), *masked[1].stride(),
        TRAIN=train, MASK=mask, OUTPUT_MASK=output is not None, ACC=tl_acc, BLOCK_M=_REDUCE_BLOCK_M,
        BLOCK_C=_REDUCE_BLOCK_C,
    )
    _finalize_kernel[(c_blocks,)](
        part, scale, var if train else scale, coef, sums, m, c, rows, *config.eps_arguments(eps),
        TRAIN=train, ACC=tl_acc, BLOCK_T=_FINALIZE_BLOCK_T, BLOCK_C=_REDUCE_BLOCK_C,
    )
    return coef


def backward(dz, x, weight, y, scale, shift, mean, var, eps, stride, dilation, groups, need_dx, need_dw,
             need_dparams):
    """Gradients of relu(bn(conv(x))) given dz: ``(dx, dw, dparams)``.

    ``mean``/``var`` given: training BatchNorm with batch statistics, dparams rows (dgamma, dbeta);
    None: BN folded into (scale, shift), dparams rows (dscale, dshift). dparams is in the accumulation
    dtype; dx (x's dtype and memory format), dw (weight's dtype, contiguous) and dparams are empty tensors
    when not needed (folded, the reductions are then skipped: dy = scale * g needs none).
    """
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    _, _, ho, wo = y.shape
    m = n * ho * wo
    train = mean is not None
    acc = accumulate_dtype(x.dtype)
    tl_acc = config.tl_acc_dtype(x.dtype)
    dot = dict(ACC=tl_acc, DOT_IN=config.dot_operand_dtype(x.dtype), PRECISION=config.dot_precision(x.dtype))
    dx, dw, dparams = conv_gradients(x, weight, need_dx, need_dw, need_dparams)
    if m == 0:  # an empty batch: dw and dparams are empty sums
        return dx, dw.zero_(), dparams.zero_()
    with device_guard(x):
        coef = coefficients(dz, y, scale, shift, mean, var, eps, dparams if need_dparams else None, mask=True)
        mean = mean if train else scale  # a placeholder pointer, never read, when not training
        per_channel = (scale, shift, mean, coef)
        if need_dx:
            block_n, block_k = config.gemm_channel_tiles(c_in // groups, c_out // groups, groups)
            k_align, even_k = config.k_range_layout(c_in // groups, c_out // groups, c_in, block_n, block_k)
            # As many pixel tiles for each phase pair (ih % stride, iw % stride) holding pixels as the
            # largest, (0, 0), needs.
            phase_pixels = n * triton.cdiv(h, stride) * triton.cdiv(w, stride)
            phases = min(stride, h) * min(stride, w)

            def grid(meta):
                return triton.cdiv(phase_pixels, meta["BLOCK_M"]) * phases, triton.cdiv(c_in, block_n)

            config.launch_autotuned(
                _dgrad_kernel, grid,
                dz, y, weight, dx, *per_channel,
                n, h, w, ho, wo, c_in, c_out, c_in // groups, c_out // groups, min(stride, w),
                *dz.stride(), *y.stride(), *weight.stride(), *dx.stride(), config.size_class(n * h * w),
                STRIDE=stride, DIL=dilation, TAP_STEP=stride // math.gcd(stride, dilation), TRAIN=train,
                K_ALIGN=k_align, EVEN_K=even_k,
                BLOCK_N=block_n, BLOCK_K=block_k, **dot,
            )
        if need_dw:
            block_co, block_ci = config.gemm_channel_tiles(c_out // groups, c_in // groups, groups, WGRAD_MAX_TILE)
            ci_span = config.groups_spanned(block_co, c_out // groups, groups) * (c_in // groups)
            ci_tiles = triton.cdiv(ci_span, block_ci)
            k_align, even_k = config.k_range_layout(c_out // groups, c_in // groups, c_out, block_co, block_ci)
            tiles = triton.cdiv(c_out, block_co) * ci_tiles
            splits = max(1, min(config.parallel_programs(x.device) // tiles, triton.cdiv(m, _WGRAD_MIN_SPLIT_PIXELS)))
            wpart = torch.empty((splits, *weight.shape), dtype=acc, device=x.device)
            config.launch_autotuned(
                _wgrad_kernel, (splits, triton.cdiv(c_out, block_co), ci_tiles),
                x, dz, y, wpart, *per_channel,
                m, h, w, ho, wo, c_in, c_out, c_in // groups, c_out // groups,
                *x.stride(), *dz.stride(), *y.stride(), config.size_class(n * h * w),
                STRIDE=stride, DIL=dilation, TRAIN=train, K_ALIGN=k_align, EVEN_K=even_k,
                BLOCK_CO=block_co, BLOCK_CI=block_ci, **dot,
            )
            _sum_splits_kernel[(triton.cdiv(dw.numel(), _SUM_BLOCK),)](
                wpart, dw, dw.numel(), splits, ACC=tl_acc, BLOCK=_SUM_BLOCK,
            )
    return dx, dw, dparams
