"""The grouped 3x3 layers the benchmark times (and the BatchNorms of their blocks), and what each op
must cost: FLOPs, the fewest bytes a fused kernel must move, and the memory floor those bytes set.

The layer tables are derived from the same recipe as ``resnext_kernels.models`` (torchvision's: stage
widths ``int(planes * base_width / 64) * groups``, stride on conv2 of each stage's first block, 224x224
images reaching the stages at 56x56); tests/test_bench.py checks them against the built models.
"""

import dataclasses
import math

# The modes the per-op benchmark times, in the order tables list them.
MODES = ("inference", "train_fwd", "train_fwd_bwd")
MODE_LABELS = {
    "inference": "inference forward",
    "train_fwd": "training forward",
    "train_fwd_bwd": "training forward+backward",
}

# The per-op benchmark's ops, with the part of a bottleneck block each one is: the grouped layer, and
# the block's two other BatchNorms as batch_norm_relu runs them (bn1 without a residual, bn3 with).
OPS = ("grouped_conv_bn_relu", "batch_norm_relu", "batch_norm_add_relu")
OP_LABELS = {
    "grouped_conv_bn_relu": "conv2+bn2+relu",
    "batch_norm_relu": "bn1+relu",
    "batch_norm_add_relu": "bn3+add+relu",
}
BOTTLENECK_EXPANSION = 4  # conv3's output channels over planes

# (blocks per stage, groups, base_width), as in resnext_kernels.models.
MODEL_CONFIGS = {
    "resnet50": ((3, 4, 6, 3), 1, 64),
    "resnet101": ((3, 4, 23, 3), 1, 64),
    "resnext50_32x4d": ((3, 4, 6, 3), 32, 4),
    "resnext101_32x4d": ((3, 4, 23, 3), 32, 4),
    "resnext101_32x8d": ((3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ((3, 4, 23, 3), 64, 4),
}

# The models whose grouped layers the per-op benchmark times (issue 6). ResNeXt-101 32x4d has exactly
# ResNeXt-50 32x4d's shapes (only more of stage 3), so it adds no case of its own.
OP_MODELS = ("resnext50_32x4d", "resnext101_64x4d", "resnext101_32x8d")

# The short --quick list: the widest layer, a stride-2 stage entry, and the smallest layer.
QUICK_LAYER_IDS = ("resnext50_32x4d:stage1", "resnext50_32x4d:stage2-first", "resnext50_32x4d:stage4")

# The BatchNorm ops' --quick list: stage 1's block, whose bn3 (256x56x56) is as large as ResNeXt-50's
# BatchNorms get, in its most frequent full-resolution block.
QUICK_BATCH_NORM_LAYER_IDS = ("resnext50_32x4d:stage1",)

STEM_OUTPUT_SIZE = 56  # a 224x224 image after the 7x7/2 convolution and the 3x3/2 max-pool
BN_STAT_BYTES = 4  # BatchNorm's parameters and running statistics stay fp32 with fp16/bf16 activations


@dataclasses.dataclass(frozen=True)
class Layer:
    """One distinct grouped 3x3 convolution shape of a model (batch size left open)."""

    model: str
    stage: int  # 1..4
    first: bool  # the stage's first block, which carries the stride (stages 2-4)
    c_in: int
    h: int
    w: int
    c_out: int
    groups: int
    stride: int
    repeats: int  # how many blocks of the model have this shape

    @property
    def id(self):
        return f"{self.model}:stage{self.stage}" + ("-first" if self.first else "")

    @property
    def h_out(self):
        return (self.h - 1) // self.stride + 1  # padding 1 keeps a 3x3 convolution "same" before striding

    @property
    def w_out(self):
        return (self.w - 1) // self.stride + 1

    @property
    def channels_per_group(self):
        return self.c_in // self.groups

    @property
    def block_out_channels(self):
        """The block's output channels (conv3's, bn3's): planes * 4, planes = 64 * 2^(stage - 1)."""
        return 64 * 2 ** (self.stage - 1) * BOTTLENECK_EXPANSION

    def as_dict(self):
        return dict(dataclasses.asdict(self), id=self.id, h_out=self.h_out, w_out=self.w_out)


def model_layers(model):
    """The distinct conv2 shapes of ``model`` (a name in MODEL_CONFIGS), stage by stage."""
    blocks, groups, base_width = MODEL_CONFIGS[model]
    layers = []
    size = STEM_OUTPUT_SIZE
    for index, count in enumerate(blocks):
        stage = index + 1
        planes = 64 * 2 ** index
        width = int(planes * (base_width / 64.0)) * groups
        if stage == 1:
            # Stage 1 does not stride: its first block's conv2 has the same shape as the others.
            layers.append(Layer(model, stage, False, width, size, size, width, groups, 1, count))
            continue
        layers.append(Layer(model, stage, True, width, size, size, width, groups, 2, 1))
        size = (size - 1) // 2 + 1
        layers.append(Layer(model, stage, False, width, size, size, width, groups, 1, count - 1))
    return layers


def op_layers(models=OP_MODELS):
    return [layer for model in models for layer in model_layers(model)]


def find_layers(ids):
    by_id = {layer.id: layer for model in MODEL_CONFIGS for layer in model_layers(model)}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ValueError(f"unknown layer id(s) {unknown}; known: {sorted(by_id)}")
    return [by_id[i] for i in ids]


def forward_flops(layer, n):
    """Multiply-adds x2 of the convolution; BatchNorm's and ReLU's few per-element FLOPs are not counted."""
    return 2 * n * layer.h_out * layer.w_out * layer.c_out * layer.channels_per_group * 9


def op_flops(layer, n, mode):
    # Backward is two convolutions of the forward's size (dgrad and wgrad): three in all.
    return forward_flops(layer, n) * (3 if mode == "train_fwd_bwd" else 1)


def activation_bytes(layer, n, itemsize):
    """(input x, output z) sizes in bytes."""
    return n * layer.c_in * layer.h * layer.w * itemsize, n * layer.c_out * layer.h_out * layer.w_out * itemsize


def op_bytes(layer, n, mode, itemsize):
    """The fewest bytes the fused op must move through device memory: each input read and each output
    written once, twice where BatchNorm's batch statistics must be complete first and a layer's
    activations do not stay in the L2 (as batch_norm_bytes counts; weights and per-channel BatchNorm
    values included, though small).

    * inference: read x, weight, gamma, beta, running mean and var; write z.
    * train_fwd: the statistics of y = conv(x) come before the first output: read x, then either
      read x again (recomputing y) or write y and read it back, whichever moves less (at a stride-2
      entry y is a quarter of x); write z; read weight, gamma, beta; read and write the running mean
      and var.
    * train_fwd_bwd: train_fwd, then a backward whose per-channel sums (of g = dz * 1[z > 0] and
      g * x_hat) come before dx and dw: read dz and a saved activation (y, or z: the same size) twice,
      x once (wgrad), the weight, gamma and beta; write dx, dweight, dgamma and dbeta. For a stride-1
      layer that is 3E forward and 6E backward (E = x's size); the kernels move 4E + 8E (they write y
      forward and read it back, and the backward reads (y, dz) three times).
    """
    x, z = activation_bytes(layer, n, itemsize)
    weight = layer.c_out * layer.channels_per_group * 9 * itemsize
    channel = layer.c_out * BN_STAT_BYTES
    if mode == "inference":
        return x + weight + 4 * channel + z
    y = z  # the convolution's output, z's size
    forward = x + min(x, 2 * y) + weight + 2 * channel + z + 4 * channel
    if mode == "train_fwd":
        return forward
    if mode == "train_fwd_bwd":
        dz, dx = z, x  # gradients are the size of their tensors
        backward_reads = 2 * (dz + z) + x + weight + 2 * channel
        backward_writes = dx + weight + 2 * channel
        return forward + backward_reads + backward_writes
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def batch_norm_shape(layer, op):
    """(channels, height, width) of the BatchNorm that ``op`` runs in ``layer``'s block: bn1 normalises
    conv1's output, which is the grouped layer's input; bn3 conv3's, at the grouped layer's output size."""
    if op == "batch_norm_relu":
        return layer.c_in, layer.h, layer.w
    if op == "batch_norm_add_relu":
        return layer.block_out_channels, layer.h_out, layer.w_out
    raise ValueError(f"{op!r} is not a BatchNorm op; expected batch_norm_relu or batch_norm_add_relu")


def batch_norm_bytes(layer, n, mode, itemsize, op):
    """The fewest bytes batch_norm_relu must move for ``op`` (see batch_norm_shape), E being x's size:

    * inference: read x (and the residual), write z: 2E (3E).
    * train_fwd: the batch statistics need all of x before the first output, and a layer's x does not
      stay in the L2 (stage 4's could: there the second read may beat this floor): read x twice (and
      the residual), write z: 3E (4E).
    * train_fwd_bwd: train_fwd, then a backward whose per-channel sums (of g = dz * 1[z > 0] and g * x_hat)
      come before dx: without a residual, read x and dz twice, write dx: 5E (the mask from x); with one,
      the sums read x, dz and z and write g (the residual's gradient), then dx reads x and g and is
      written: 7E.

    Per-channel values (fp32) count as in op_bytes: gamma, beta and the running statistics read,
    the running statistics written in training, dgamma and dbeta written in backward.
    """
    channels, h, w = batch_norm_shape(layer, op)
    e = n * channels * h * w * itemsize
    channel = channels * BN_STAT_BYTES
    residual = op == "batch_norm_add_relu"
    if mode == "inference":
        return (3 if residual else 2) * e + 4 * channel
    forward = (4 if residual else 3) * e + 2 * channel + 4 * channel
    if mode == "train_fwd":
        return forward
    if mode == "train_fwd_bwd":
        return forward + (7 if residual else 5) * e + 2 * channel + 2 * channel
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def floor_seconds(nbytes, bandwidth):
    """Time to move ``nbytes`` at ``bandwidth`` bytes/s: no kernel can run faster than this."""
    return nbytes / bandwidth


def rotation_sets(bytes_per_set, cache_bytes, limit=8):
    """How many input sets to rotate among so that, together, they are at least twice the cache: a
    repeated run then finds its inputs evicted, as a layer in a real network does."""
    if cache_bytes <= 0 or bytes_per_set <= 0:
        return 1
    return max(1, min(limit, math.ceil(2 * cache_bytes / bytes_per_set)))
