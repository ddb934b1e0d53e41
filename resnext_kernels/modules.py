"""ResNeXtBlock, a drop-in for torchvision's Bottleneck whose conv2 + bn2 + relu run fused (and bn1 +
relu, bn3 + add + relu as one op each), and ``convert`` which swaps it into existing torchvision and
timm models."""

import warnings

import torch
from torch import nn

from .functional import autocast_conv_dtype, batch_norm_relu, check_impl, grouped_conv_bn_relu


def _is_frozen_batch_norm(bn):
    """torchvision's FrozenBatchNorm2d (detection backbones): BatchNorm with fixed statistics and
    affine. Known by name, so that torchvision stays optional and torch.compile traces no import."""
    kind = type(bn)
    return kind.__name__ == "FrozenBatchNorm2d" and kind.__module__ == "torchvision.ops.misc"


def _fusable_batch_norm_channels(bn):
    """The channels of an nn.BatchNorm2d or FrozenBatchNorm2d; None for any other norm layer."""
    if type(bn) is nn.BatchNorm2d:
        return bn.num_features
    if _is_frozen_batch_norm(bn):
        return bn.running_mean.shape[0]
    return None


def _keeps_dtype(bn, dtype):
    """Whether bn's output has its input's ``dtype``, as the fused ops' does: nn.BatchNorm2d's always;
    FrozenBatchNorm2d computes x * scale + shift with its buffers, so promotes x to their dtype."""
    return not _is_frozen_batch_norm(bn) or all(
        t.dtype == dtype for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))


def conv3x3_is_fusable(conv, bn, x):
    """Whether ``relu(bn(conv(x)))`` is exactly what grouped_conv_bn_relu computes."""
    channels = _fusable_batch_norm_channels(bn)
    return (
        channels is not None
        and _keeps_dtype(bn, autocast_conv_dtype(x))
        and type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.bias is None
        and conv.padding_mode == "zeros"
        and conv.stride[0] == conv.stride[1]
        and conv.dilation[0] == conv.dilation[1]
        and conv.padding == conv.dilation
        and channels == conv.out_channels
    )


def batch_norm_is_fusable(bn, x, residual=None):
    """Whether ``relu(bn(x) + residual)`` (or ``relu(bn(x))``) is exactly what batch_norm_relu computes."""
    return (
        x.dim() == 4
        and _fusable_batch_norm_channels(bn) == x.shape[1]
        and _keeps_dtype(bn, x.dtype)
        and (residual is None
             or (residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device))
    )


_CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _called_plainly(*modules):
    """Whether calling these modules would run their forwards alone: no forward or backward hooks on
    them or on every module (pruning, weight_norm, observers, feature taps), which a fused op would
    skip, and no FX symbolic trace (which records module calls and cannot branch on tensors)."""
    return not (
        torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        or any(getattr(nn.modules.module, "_global" + hooks) for hooks in _CALL_HOOKS)
        or any(getattr(module, hooks) for module in modules for hooks in _CALL_HOOKS)
    )


def _has_hooks(module):
    """Whether ``module`` has hooks of any kind (forward, backward, state_dict...)."""
    return any(isinstance(value, dict) and value for name, value in vars(module).items() if "hook" in name)


def _batch_norm_arguments(bn):
    """The BatchNorm arguments of the fused ops for ``bn``, with nn.BatchNorm2d.forward's bookkeeping:
    num_batches_tracked, momentum=None as a cumulative average, track_running_stats=False. A
    FrozenBatchNorm2d always normalises with its fixed statistics, in training too."""
    if _is_frozen_batch_norm(bn):
        return dict(bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var,
                    training=False, eps=bn.eps)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return dict(bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean if keep_running else None,
                running_var=bn.running_var if keep_running else None, training=use_batch_stats, momentum=momentum,
                eps=bn.eps)


def fused_conv_bn_relu(conv, bn, x, impl):
    """``relu(bn(conv(x)))`` through grouped_conv_bn_relu, BatchNorm as bn's forward would run it."""
    return grouped_conv_bn_relu(x, conv.weight, stride=conv.stride[0], dilation=conv.dilation[0], groups=conv.groups,
                                impl=impl, **_batch_norm_arguments(bn))


def fused_batch_norm_relu(bn, x, impl, residual=None):
    """``relu(bn(x) + residual)`` (or ``relu(bn(x))``) through batch_norm_relu, BatchNorm as bn's forward
    would run it."""
    return batch_norm_relu(x, residual=residual, impl=impl, **_batch_norm_arguments(bn))


class ResNeXtBlock(nn.Module):
    """torchvision's ``Bottleneck`` (expansion 4, stride on the 3x3 conv) with the same submodule
    names, so state_dicts are interchangeable. With nn.BatchNorm2d or torchvision's FrozenBatchNorm2d,
    conv2 + bn2 + relu run through grouped_conv_bn_relu, and bn1 + relu and bn3 + add + relu through
    batch_norm_relu; another norm layer, an activation other than nn.ReLU, hooks on the modules a fused
    op stands in for, or an FX trace run those modules unfused, as in torchvision."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=32, base_width=4, dilation=1,
                 norm_layer=None, *, impl="auto"):
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, groups=groups, bias=False, dilation=dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.impl = check_impl(impl)

    @classmethod
    def from_modules(cls, conv1, bn1, conv2, bn2, conv3, bn3, downsample, relu=None, *, impl="auto"):
        """A block made of existing modules (parameters and buffers shared, not copied)."""
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.conv1, block.bn1, block.conv2, block.bn2, block.conv3, block.bn3 = conv1, bn1, conv2, bn2, conv3, bn3
        block.relu = nn.ReLU(inplace=True) if relu is None else relu
        block.downsample = downsample
        block.stride = conv2.stride[0]
        block.impl = check_impl(impl)
        return block

    def zero_init_last(self):
        """Zeros bn3's weight, so that the block starts as its shortcut: torchvision's ResNet does this
        for zero_init_residual=True, and timm's init_weights calls it on every module that has it (so a
        converted timm model's blocks keep it)."""
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self._bn_relu(self.bn1, self.conv1(x))
        if self._fusable(self.conv2, self.bn2) and conv3x3_is_fusable(self.conv2, self.bn2, out):
            out = fused_conv_bn_relu(self.conv2, self.bn2, out, self.impl)
        else:
            out = self.relu(self.bn2(self.conv2(out)))
        return self._bn_relu(self.bn3, self.conv3(out), identity)

    def _fusable(self, *modules):
        """Whether a fused op may stand in for calling ``modules`` and then self.relu."""
        return type(self.relu) is nn.ReLU and _called_plainly(*modules, self.relu)

    def _bn_relu(self, bn, x, residual=None):
        if self._fusable(bn) and batch_norm_is_fusable(bn, x, residual):
            return fused_batch_norm_relu(bn, x, self.impl, residual)
        out = bn(x)
        if residual is not None:
            out += residual
        return self.relu(out)

    def extra_repr(self):
        return f"impl={self.impl!r}"


def _block_from_torchvision(block, impl):
    return ResNeXtBlock.from_modules(block.conv1, block.bn1, block.conv2, block.bn2, block.conv3, block.bn3,
                                     block.downsample, block.relu, impl=impl)


def _block_from_timm(block, impl):
    """timm's Bottleneck computes what ResNeXtBlock does when its extras are all off."""
    plain = (
        all(type(getattr(block, name, None)) is nn.ReLU for name in ("act1", "act2", "act3"))
        and all(isinstance(getattr(block, name, None), (type(None), nn.Identity))
                for name in ("drop_block", "aa", "se", "drop_path"))
        and type(block.bn1) is nn.BatchNorm2d
        and type(block.bn3) is nn.BatchNorm2d
    )
    if not plain:
        return None
    return ResNeXtBlock.from_modules(block.conv1, block.bn1, block.conv2, block.bn2, block.conv3, block.bn3,
                                     block.downsample, impl=impl)


def _lost_hooks_reason(old, new):
    """Why ``new`` may not replace ``old``: a submodule of old's that new does not keep (timm's act1..3,
    its Identity placeholders) has hooks, which would silently stop running; else None."""
    kept = set(new.modules())
    for name, module in old.named_modules():
        if module not in kept and _has_hooks(module):
            return f"its {name} has hooks, and the new block would not keep it"
    return None


def _converters():
    converters = []
    try:
        from torchvision.models.resnet import Bottleneck
    except ImportError:
        pass
    else:
        converters.append((Bottleneck, _block_from_torchvision))
    try:
        from timm.models.resnet import Bottleneck as TimmBottleneck
    except ImportError:
        pass
    else:
        converters.append((TimmBottleneck, _block_from_timm))
    return converters


def convert(model, impl="auto"):
    """Swaps every torchvision and timm bottleneck in ``model`` for a ResNeXtBlock that shares its
    parameters and buffers (state_dict keys unchanged); ResNeXtBlocks already there get ``impl``.
    Modifies ``model`` in place and returns it (or the new block when ``model`` itself is one)."""
    check_impl(impl)
    converters = _converters()

    def swap(module, name):
        if isinstance(module, ResNeXtBlock):
            module.impl = impl
            return module
        for kind, build in converters:
            if isinstance(module, kind):
                # A subclass with its own forward computes something else; a new block would lose hooks.
                if type(module).forward is not kind.forward:
                    reason = f"its forward is not {kind.__module__}.{kind.__name__}'s"
                elif _has_hooks(module):
                    reason = "it has hooks, which a new block would not have"
                else:
                    block = build(module, impl)
                    reason = ("it uses features ResNeXtBlock does not have (activation, norm layer, SE, "
                              "anti-aliasing, drop-path)") if block is None else _lost_hooks_reason(module, block)
                if reason is not None:
                    warnings.warn(f"convert: left {name or 'the model'} ({type(module).__name__}) unchanged: "
                                  f"{reason}", stacklevel=3)
                    return module
                block.training = module.training  # its submodules keep their own modes (frozen BatchNorms)
                return block
        for child_name, child in module.named_children():
            new = swap(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                setattr(module, child_name, new)
        return module

    return swap(model, "")


__all__ = ["ResNeXtBlock", "convert"]
