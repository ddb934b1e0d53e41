"""Launch policy shared by the kernels: interpreter switch, dtypes, tf32 policy, tile shapes, autotuning.

Tile shapes. Every GEMM-like kernel tiles channels in the order the groups lay them out. A tile of
``block`` channels on the "N side" covers ``block / channels_per_group`` whole groups, and its
reduction ("K side") runs over the channels of exactly those groups; the weight tile is therefore
block-diagonal and its off-group entries are masked to zero. On the GPU ``tl.dot`` needs every dimension
>= 16 while ResNeXt has 4-32 channels per group, so tiles never go below 16 channels: groups smaller
than that are packed several to a tile (e.g. 4 groups of 4 channels in one 16 x 16 weight tile). The
zeros cost tensor-core work, not bytes, and these layers are bandwidth-bound.

Packing must not change IEEE semantics: a non-finite input would reach the other groups of its tile
through ``inf * 0 = nan`` inside ``tl.dot``. Kernels whose GEMM mixes groups (the convolution and dgrad)
therefore check each finished tile, and recompute a tile holding any NaN or Inf -- which a leak always
produces -- from in-group products only, one channel at a time. Finite data pays one reduction per tile.

Precision. fp16/bf16 and fp32 accumulate in fp32, fp64 in fp64. fp32 dot products follow cuDNN's own
setting for convolutions, read at every call: TF32 when cuDNN's convolutions may use it (PyTorch's
default; ``torch.backends.cudnn.conv.fp32_precision``, or ``allow_tf32``), IEEE fp32 otherwise.
Triton's interpreter always computes in full precision.
"""

import functools
import math
import os
import struct
import threading

import torch
import triton
import triton.language as tl

from ..outputs import accumulate_dtype

# @triton.jit reads TRITON_INTERPRET when it decorates a kernel, i.e. when the kernel modules are
# imported; this flag is read at the same moment so that both agree.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("RESNEXT_KERNELS_TRITON_AUTOTUNE", "1") != "0"
# Held around every autotuned launch until its config has been read: an autotuner keeps the arguments
# and choice of the call it serves in attributes shared by every caller (e.g. autograd's threads of two
# GPUs).
_AUTOTUNED_LAUNCH = threading.Lock()

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

# Tiles never go below tl.dot's minimum dimension on the GPU, or above what keeps registers in check.
MIN_DOT = 16
MAX_CHANNEL_TILE = 64


def tl_acc_dtype(dtype):
    return _TL_DTYPES[accumulate_dtype(dtype)]


def dot_operand_dtype(dtype):
    # The interpreter has no bf16 matmul (tl.dot on bf16 operands returns garbage there), so bf16 dot
    # operands are upcast, exactly, to fp32 when interpreting; compiled kernels keep bf16 tensor cores.
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


# Compiled kernels round fp32 -> bf16 to nearest even; the interpreter truncates (it implements the
# conversion by dropping bits), which would make every bf16 result twice as coarse in CPU tests.
_EMULATE_BF16_ROUNDING = tl.constexpr(INTERPRET)


@triton.jit
def cast(v, dtype: tl.constexpr):
    """``v.to(dtype)``, rounding to nearest even under the interpreter as well."""
    if _EMULATE_BF16_ROUNDING and dtype == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # A NaN stays one: its quiet bit set, as the GPU's conversion does (rounding would carry a payload
        # in the low half into Inf, or wrap an all-ones one to zero).
        bits = tl.where(v != v, bits | 0x00400000, rounded)
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def has_non_finite(acc):
    return tl.max(tl.where((acc == acc) & (tl.abs(acc) != float("inf")), 0, 1)) > 0


@triton.jit
def k_mask(offs_k, k_hi, EVEN_K: tl.constexpr):
    """``offs_k < k_hi``, as a constant where K chunks are whole, so loads along K stay vectorised."""
    if EVEN_K:
        return tl.full(offs_k.shape, 1, tl.int1)
    return offs_k < k_hi


@triton.jit
def weight_offsets(c_out, ci, kh, kw, swo, swi, swh, sww):
    """Element offsets of weight[c_out, ci, kh, kw] in 64 bits: a weight may be a view into a larger
    tensor, whose strides 32-bit products would overflow (as activations' channel offsets would)."""
    wide = tl.int64
    return tl.cast(c_out, wide) * swo + tl.cast(ci, wide) * swi + tl.cast(kh, wide) * swh + tl.cast(kw, wide) * sww


def eps_arguments(eps):
    """BatchNorm's ``eps`` as two kernel arguments for add_eps: its fp32 rounding and the rest. A
    compiled kernel takes a Python float as fp32 (the interpreter keeps it exact), which would round
    an fp64 BatchNorm's eps."""
    try:
        high = struct.unpack("f", struct.pack("f", eps))[0]
    except OverflowError:
        high = math.inf
    if math.isinf(high):  # beyond fp32's range: inf, as fp32 BatchNorm adds (fp64 would add eps: left aside)
        return math.copysign(math.inf, eps), 0.0
    return high, eps - high


@triton.jit
def add_eps(v, eps_high, eps_low):
    """``v + eps`` from eps_arguments, in v's dtype: fp32(eps) in fp32, eps to 48 bits in fp64."""
    return v + (tl.cast(eps_high, v.dtype) + tl.cast(eps_low, v.dtype))


def dot_precision(dtype):
    if dtype == torch.float32 and _cudnn_conv_allows_tf32():
        return "tf32"
    return "ieee"


def _cudnn_conv_allows_tf32():
    # As ATen resolves it for cuDNN's convolutions: the first setting that is not "none" of the
    # convolution's, cuDNN's and the generic one. torch.backends.cudnn.allow_tf32 writes the first but
    # raises when read while the convolution's and the RNN's settings differ.
    for precision in (torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                      torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def groups_spanned(block, per_group, groups):
    """How many groups a tile of ``block`` consecutive channels can touch."""
    if block % per_group == 0:
        spanned = block // per_group
    elif per_group % block == 0:
        spanned = 1
    else:  # tiles straddle group boundaries at varying offsets
        spanned = (block - 1) // per_group + 2
    return min(spanned, groups)


def channel_tile(channels, max_tile=MAX_CHANNEL_TILE):
    return min(max(triton.next_power_of_2(channels), MIN_DOT), max_tile)


def gemm_channel_tiles(n_per_group, k_per_group, groups, max_tile=MAX_CHANNEL_TILE):
    """(BLOCK_N, BLOCK_K) for a grouped GEMM whose N side has ``n_per_group`` channels per group and
    whose K side has ``k_per_group``: N tiles cover whole groups where they are small, K tiles the
    channels of the groups one N tile covers."""
    block_n = channel_tile(n_per_group, max_tile)
    block_k = channel_tile(groups_spanned(block_n, n_per_group, groups) * k_per_group, max_tile)
    return block_n, block_k


def k_range_layout(n_per_group, k_per_group, n_channels, block_n, block_k):
    """(K_ALIGN, EVEN_K) for the K ranges of a grouped GEMM's N tiles, as compile-time facts for the
    compiler's vectoriser: every range starts at a multiple of K_ALIGN (a power of two <= 16), and with
    EVEN_K every range is whole K chunks, so loads along K need no mask."""
    if block_n % n_per_group == 0:  # tiles of whole groups: ranges start at multiples of their length
        span = block_n // n_per_group * k_per_group
        even = n_channels % block_n == 0
    else:  # tiles within one group (or straddling two): ranges start at a group's first channel
        span = k_per_group
        even = n_per_group % block_n == 0
    return min(span & -span, 16), even and span % block_k == 0


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def parallel_programs(device):
    """About how many programs fill the device (a few per SM); the interpreter runs them one by one."""
    if device.type != "cuda":
        return 2
    return 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


# What the autotuners key on: a layer's channels, groups, stride, dilation and precision, the tensors'
# dtypes, and SIZE_CLASS, an argument the kernels take for it alone.
AUTOTUNE_KEY = ["C_IN", "C_OUT", "GROUP_IN", "GROUP_OUT", "STRIDE", "DIL", "PRECISION", "SIZE_CLASS"]


def size_class(pixels):
    """SIZE_CLASS for a launch over ``pixels`` input pixels (N x H x W): the tiles that fill a GPU best
    depend on how much work there is (a first call on one image against training at 128), to within a
    factor of two."""
    return max(pixels, 1).bit_length()


def launch_autotuned(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` for a triton.autotune'd kernel; returns the config it ran with.
    With torch.use_deterministic_algorithms(True) the last config runs, untimed: a tile size orders the
    kernel's partial sums, and timing may pick another one in the next process. The last is the one
    certain to fit in shared memory (autotune_configs), unpipelined: slower, as deterministic modes are."""
    if torch.are_deterministic_algorithms_enabled():
        chosen = kernel.configs[-1]
        kernel.fn[grid](*args, **kwargs, **chosen.all_kwargs())
        return chosen
    with _AUTOTUNED_LAUNCH:
        kernel[grid](*args, **kwargs)
        return kernel.best_config


def autotune_configs(param, values):
    """A few configs, ``(tile size, warps, pipeline stages)``, for triton.autotune to choose from per shape
    class. The last one is unpipelined: pipelined fp32/fp64 tiles of 64 channels need more than the
    227 KB of shared memory an H100 has, and autotuning skips configs that do not fit, so one must always
    fit (tests/test_triton.py checks this for sm_90). It is also the only config under the interpreter
    (which runs programs one by one and has nothing to tune) and with RESNEXT_KERNELS_TRITON_AUTOTUNE=0,
    for test runs on a GPU, where compiling and timing every config of every shape would dominate."""
    if INTERPRET or not AUTOTUNE:
        values = values[-1:]
    return [triton.Config({param: value}, num_warps=warps, num_stages=stages) for value, warps, stages in values]
