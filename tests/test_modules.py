"""ResNeXtBlock, the models and convert() against torchvision's (and timm's) modules."""

import copy
import functools

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

import resnext_kernels
from conftest import DEVICE, KERNEL_IMPLS
from resnext_kernels import ResNeXtBlock

IMPLS = ["torch"] + KERNEL_IMPLS


def randomise_bn(module):
    """Non-trivial affine parameters and running stats, so that a swapped buffer would show."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                if getattr(m, "affine", True):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return module


def assert_same_state(ours, theirs, rtol=1e-5, atol=1e-5):
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        assert torch.allclose(ours[key].double(), theirs[key].double(), rtol=rtol, atol=atol), key


def make_block_pair(impl, *, stride=1, groups=4, base_width=4, inplanes=32, planes=16, **bn_kwargs):
    def norm_layer(channels):
        return nn.BatchNorm2d(channels, **bn_kwargs)

    downsample = None
    if stride != 1 or inplanes != planes * 4:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), norm_layer(planes * 4))
    theirs = Bottleneck(inplanes, planes, stride, downsample, groups, base_width, norm_layer=norm_layer)
    theirs = randomise_bn(theirs).to(DEVICE)
    ours = ResNeXtBlock(inplanes, planes, stride, copy.deepcopy(downsample), groups, base_width,
                        norm_layer=norm_layer, impl=impl).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "bn_kwargs",
    [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}],
    ids=["default", "cumulative-average", "no-running-stats", "no-affine"],
)
@pytest.mark.parametrize("stride", [1, 2])
def test_block_matches_torchvision_bottleneck_in_train_and_eval(impl, bn_kwargs, stride):
    ours, theirs = make_block_pair(impl, stride=stride, **bn_kwargs)
    for step in range(3):
        x = torch.randn(2, 32, 9, 7, device=DEVICE)
        out, expected = ours(x), theirs(x)
        assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4), f"train step {step}"
        (out.square().sum() + 0).backward()
        expected.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-3), name
    assert_same_state(ours, theirs)
    if bn_kwargs.get("track_running_stats", True):
        assert ours.bn2.num_batches_tracked.item() == 3
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 32, 9, 7, device=DEVICE)
    assert torch.allclose(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stride, inplanes", [(2, 32), (1, 64)], ids=["downsample", "identity"])
@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_block_under_autocast_matches_torchvision_bottleneck(impl, stride, inplanes, input_dtype):
    # As in a network under autocast: fp32 parameters, bf16 activations between the layers. An fp32
    # input also meets the block's fp32 identity in bn3's residual.
    ours, theirs = make_block_pair(impl, stride=stride, inplanes=inplanes)
    x = torch.randn(2, inplanes, 9, 7, device=DEVICE).to(input_dtype)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, expected = ours(x), theirs(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    out.float().square().sum().backward()
    expected.float().square().sum().backward()
    # The weights' gradients are bf16 convolutions' (cast to fp32): a bf16 ulp or two apart where an
    # upstream gradient rounds the other way.
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=1e-3, msg=lambda m: f"{name}: {m}")
    assert_same_state(ours, theirs)


def record_fused_calls(monkeypatch):
    """The block's calls of the fused ops from now on, as (op, residual given, training)."""
    calls = []
    for name in ("grouped_conv_bn_relu", "batch_norm_relu"):
        def record(*args, _name=name, _op=getattr(resnext_kernels.modules, name), **kwargs):
            calls.append((_name, kwargs.get("residual") is not None, kwargs["training"]))
            return _op(*args, **kwargs)
        monkeypatch.setattr(resnext_kernels.modules, name, record)
    return calls


@pytest.mark.parametrize("impl", IMPLS)
def test_block_runs_its_three_batch_norms_fused(impl, monkeypatch):
    # bn1 + relu, conv2 + bn2 + relu, and bn3 + the residual + relu: each one op, in train and eval.
    ours, _ = make_block_pair(impl, stride=2)
    calls = record_fused_calls(monkeypatch)
    x = torch.randn(2, 32, 9, 7, device=DEVICE)
    ours.train()(x)
    ours.eval()(x)
    assert calls == [(op, residual, training) for training in (True, False)
                     for op, residual in (("batch_norm_relu", False), ("grouped_conv_bn_relu", False),
                                          ("batch_norm_relu", True))]


def test_block_with_another_norm_layer_runs_unfused():
    gn = lambda c: nn.GroupNorm(4, c)  # noqa: E731
    theirs = Bottleneck(64, 16, 1, None, 4, 16, norm_layer=gn).to(DEVICE)
    ours = ResNeXtBlock(64, 16, 1, None, 4, 16, norm_layer=gn).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 64, 5, 5, device=DEVICE)
    assert torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_with_frozen_batch_norm_runs_fused(impl, monkeypatch):
    # Detection backbones (torchvision's with FrozenBatchNorm2d) train with fixed BN statistics and
    # affine: conv2 + bn2 + relu still fuse, through the eval path, in training mode too.
    norm_layer = functools.partial(FrozenBatchNorm2d, eps=1e-3)  # not the default: eps must reach the op
    theirs = randomise_bn(Bottleneck(64, 16, 1, None, 4, 16, norm_layer=norm_layer)).to(DEVICE)
    ours = ResNeXtBlock(64, 16, 1, None, 4, 16, norm_layer=norm_layer, impl=impl).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    modes = record_fused_calls(monkeypatch)
    x = torch.randn(2, 64, 7, 5, device=DEVICE, requires_grad=True)
    x_theirs = x.detach().clone().requires_grad_()
    out, expected = ours.train()(x), theirs.train()(x_theirs)
    assert modes == [("batch_norm_relu", False, False), ("grouped_conv_bn_relu", False, False),
                     ("batch_norm_relu", True, False)]
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert torch.allclose(x.grad, x_theirs.grad, rtol=1e-3, atol=1e-3)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-3), name
    assert_same_state(ours, theirs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_with_frozen_batch_norm_under_autocast_matches_torchvision(impl, buffer_dtype):
    # FrozenBatchNorm2d computes x * scale + shift with its buffers: bf16 activations and fp32 buffers
    # give fp32, which the fused ops (x's dtype) do not give, so they run unfused, as torchvision's.
    # With bf16 buffers they run fused, rounding once where torchvision rounds scale, shift and x *
    # scale too: within torchvision's own error of the float64 result.
    theirs = randomise_bn(Bottleneck(64, 16, 1, None, 4, 16, norm_layer=FrozenBatchNorm2d)).to(DEVICE)
    for m in theirs.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.to(buffer_dtype)
    ours = ResNeXtBlock(64, 16, 1, None, 4, 16, norm_layer=FrozenBatchNorm2d, impl=impl).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    for m in ours.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.to(buffer_dtype)
    x = torch.randn(2, 64, 7, 5, device=DEVICE).to(torch.bfloat16)
    expected64 = copy.deepcopy(theirs).double()(x.double())
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, expected = ours(x), theirs(x)
    assert out.dtype == expected.dtype == (torch.float32 if buffer_dtype == torch.float32 else torch.bfloat16)
    if buffer_dtype == torch.float32:
        torch.testing.assert_close(out, expected)
    else:
        def error(z):
            return ((z.double() - expected64).norm() / expected64.norm()).item()
        assert error(out) <= 1.25 * error(expected)


def test_block_defaults_are_resnext_32x4d():
    block = ResNeXtBlock(256, 64)
    assert block.conv2.groups == 32 and block.conv2.in_channels == 128 and block.impl == "auto"
    with pytest.raises(ValueError, match="impl must be one of"):
        ResNeXtBlock(256, 64, impl="cudnn")


def torchvision_model(name):
    if name == "resnext101_32x4d":  # torchvision has no such model: its 32x8d layout with width 4
        return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)
    return getattr(torchvision.models, name)()


@pytest.mark.parametrize(
    "name", ["resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext101_64x4d"]
)
def test_model_state_dict_matches_torchvision(name):
    ours = getattr(resnext_kernels, name)(num_classes=10)
    theirs = torchvision_model(name)
    theirs.fc = nn.Linear(theirs.fc.in_features, 10)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    assert all(ours_state[k].shape == theirs_state[k].shape for k in ours_state)


@pytest.mark.parametrize("impl", IMPLS)
def test_model_matches_torchvision_with_its_weights(impl):
    # float64: in train mode at this size layer4's BatchNorm sees 2 values per channel, so badly
    # conditioned that fp32 results differ from each other as much as from the exact ones.
    theirs = randomise_bn(torchvision.models.resnext50_32x4d(num_classes=10)).to(DEVICE, torch.float64)
    ours = resnext_kernels.resnext50_32x4d(num_classes=10, impl=impl).to(DEVICE, torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE, dtype=torch.float64)
    assert torch.allclose(ours(x), theirs(x), rtol=1e-3, atol=1e-3)
    assert_same_state(ours, theirs, rtol=1e-4, atol=1e-4)
    ours.eval()
    theirs.eval()
    assert torch.allclose(ours(x), theirs(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_model_inference_matches_torchvision(impl):
    theirs = randomise_bn(torchvision.models.resnext50_32x4d(num_classes=10)).to(DEVICE).eval()
    ours = resnext_kernels.resnext50_32x4d(num_classes=10, impl=impl).to(DEVICE).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name, params", [("resnext29_8x64d", 34.4e6), ("resnext29_16x64d", 68.1e6)])
def test_cifar_resnext29_has_the_papers_size(name, params):
    model = getattr(resnext_kernels, name)()
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.01, count  # the paper's Table 7
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("impl", IMPLS)
def test_convert_torchvision_resnext50(impl):
    # float64, as in test_model_matches_torchvision_with_its_weights.
    original = randomise_bn(torchvision.models.resnext50_32x4d(num_classes=10)).to(DEVICE, torch.float64)
    converted = resnext_kernels.convert(copy.deepcopy(original), impl=impl)
    blocks = [m for m in converted.modules() if isinstance(m, ResNeXtBlock)]
    assert len(blocks) == 16 and all(b.impl == impl for b in blocks)
    assert not any(type(m) is Bottleneck for m in converted.modules())
    x = torch.randn(2, 3, 32, 32, device=DEVICE, dtype=torch.float64)
    assert torch.allclose(converted(x), original(x), rtol=1e-3, atol=1e-3)
    assert_same_state(converted, original, rtol=1e-4, atol=1e-4)
    converted.eval()
    original.eval()
    assert torch.allclose(converted(x), original(x), rtol=1e-3, atol=1e-3)


def test_convert_shares_parameters():
    model = torchvision.models.resnext50_32x4d()
    conv2 = model.layer1[0].conv2
    converted = resnext_kernels.convert(model, impl="torch")
    assert converted is model and model.layer1[0].conv2 is conv2
    block = resnext_kernels.convert(Bottleneck(64, 16, groups=4, base_width=16))
    assert isinstance(block, ResNeXtBlock)


def test_convert_timm_resnext():
    timm = pytest.importorskip("timm")
    original = randomise_bn(timm.create_model("resnext50d_32x4d", pretrained=False, num_classes=10)).to(DEVICE)
    converted = resnext_kernels.convert(copy.deepcopy(original), impl="torch")
    assert sum(isinstance(m, ResNeXtBlock) for m in converted.modules()) == 16
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    assert torch.allclose(converted(x), original(x), rtol=1e-3, atol=1e-3)
    assert_same_state(converted, original, rtol=1e-4, atol=1e-4)
    # timm's init_weights zeros the last BatchNorm of every block through the block's zero_init_last.
    def zeroed(model):
        return {key for key, value in model.state_dict().items() if value.count_nonzero() == 0}

    original.init_weights(zero_init_last=True)
    converted.init_weights(zero_init_last=True)
    assert zeroed(converted) == zeroed(original)
    assert sum(key.endswith("bn3.weight") for key in zeroed(converted)) == 16


def test_convert_leaves_timm_blocks_it_cannot_represent():
    timm = pytest.importorskip("timm")
    model = timm.create_model("seresnext26d_32x4d", pretrained=False)
    with pytest.warns(UserWarning, match="left .* unchanged"):
        converted = resnext_kernels.convert(model)
    assert not any(isinstance(m, ResNeXtBlock) for m in converted.modules())


def test_convert_leaves_timm_blocks_whose_dropped_modules_have_hooks():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet26", pretrained=False)
    calls = []
    model.layer1[0].act2.register_forward_hook(lambda *_: calls.append(1))
    with pytest.warns(UserWarning, match=r"left layer1\.0 .* unchanged: its act2 has hooks"):
        converted = resnext_kernels.convert(model)
    assert type(converted.layer1[0]) is not ResNeXtBlock and type(converted.layer1[1]) is ResNeXtBlock
    converted.eval()(torch.randn(1, 3, 32, 32))
    assert calls == [1]


def small_bottleneck():
    downsample = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))
    return randomise_bn(Bottleneck(16, 8, downsample=downsample, groups=2, base_width=32)).to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_convert_keeps_the_modes_of_frozen_batch_norms(impl):
    # model.train() and then bn.eval() on every BatchNorm: a common fine-tuning set-up.
    original = small_bottleneck().train()
    for m in original.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    converted = resnext_kernels.convert(copy.deepcopy(original), impl=impl)
    assert isinstance(converted, ResNeXtBlock) and converted.training
    assert not any(m.training for m in converted.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-4)
    assert_same_state(converted, original)


def test_convert_keeps_a_replaced_activation():
    original = small_bottleneck().eval()
    original.relu = nn.SiLU()
    converted = resnext_kernels.convert(copy.deepcopy(original), impl="torch")
    assert type(converted.relu) is nn.SiLU
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_pruning_the_grouped_conv_survives_convert(impl):
    # Pruning recomputes conv2.weight in a forward pre-hook: conv2 + bn2 + relu then run unfused
    # (bn1 and bn3 still fused), over several training steps.
    original = small_bottleneck().train()
    copied = copy.deepcopy(original)  # before pruning: a pruned module cannot be deep-copied
    for model in (original, copied):
        prune.l1_unstructured(model.conv2, "weight", 0.5)
    converted = resnext_kernels.convert(copied, impl=impl)
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    for _ in range(2):
        for model in (original, converted):
            model.zero_grad()
            model(x).square().sum().backward()
        torch.testing.assert_close(converted.conv2.weight_orig.grad, original.conv2.weight_orig.grad,
                                   rtol=1e-4, atol=1e-4)
    assert_same_state(converted, original)


def test_hooks_on_the_fused_modules_and_on_every_module_run():
    block = resnext_kernels.convert(small_bottleneck(), impl="torch")
    called = []
    for name in ("bn1", "bn2", "bn3"):
        getattr(block, name).register_forward_hook(lambda *_, name=name: called.append(name))
    block(torch.randn(2, 16, 5, 5, device=DEVICE))
    assert called == ["bn1", "bn2", "bn3"]
    kinds = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, *_: kinds.append(type(module)))
    try:
        resnext_kernels.convert(small_bottleneck(), impl="torch")(torch.randn(2, 16, 5, 5, device=DEVICE))
    finally:
        handle.remove()
    assert kinds.count(nn.BatchNorm2d) == 4 and kinds.count(nn.ReLU) == 3


def test_convert_leaves_blocks_with_hooks_or_their_own_forward():
    class Scaled(Bottleneck):
        def forward(self, x):
            return super().forward(x) * 0.5

    hooked = small_bottleneck()
    hooked.register_forward_hook(lambda *_: None)
    for block, reason in ((hooked, "it has hooks"), (Scaled(16, 4), "its forward is not")):
        with pytest.warns(UserWarning, match=f"left the model .* unchanged: {reason}"):
            assert resnext_kernels.convert(block) is block


def test_fx_symbolic_trace_of_a_block():
    block = resnext_kernels.convert(small_bottleneck(), impl="torch").eval()
    traced = torch.fx.symbolic_trace(block)
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    torch.testing.assert_close(traced(x), block(x))


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_exported_block_runs_the_fused_ops(impl, training):
    # torch.export (deployment, AOTInductor): the graph keeps the fused ops, and the exported program
    # computes what the block computes, running statistics included.
    torch.manual_seed(0)
    block = randomise_bn(ResNeXtBlock(64, 16, groups=4, base_width=16, impl=impl)).to(DEVICE).train(training)
    reference = copy.deepcopy(block)
    x = torch.randn(2, 64, 5, 7, device=DEVICE)
    program = torch.export.export(block, (x,))
    op = {("triton", True): "resnext_kernels.triton_conv_bn_relu_train",
          ("triton", False): "resnext_kernels.triton_conv_scale_shift_relu",
          ("cuda", True): ".conv_bn_relu_train", ("cuda", False): ".conv_bn_relu_folded"}[impl, training]
    assert op in program.graph_module.print_readable(print_output=False)
    exported = program.module()
    torch.testing.assert_close(exported(x), reference(x), rtol=1e-4, atol=1e-4)
    assert_same_state(exported, reference)


@pytest.mark.parametrize("impl", ["torch"] + KERNEL_IMPLS)
def test_compiled_block_with_dynamic_shapes_has_no_graph_breaks(impl):
    # Symbolic sizes reach the backend choice and the ops' fake kernels: one graph for every size.
    torch.manual_seed(0)
    block = ResNeXtBlock(64, 16, groups=4, base_width=16, impl=impl).to(DEVICE).train()
    reference = copy.deepcopy(block)
    reference.impl = "torch"
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend="aot_eager")
    for size in ((5, 5), (7, 6)):
        x = torch.randn(2, 64, *size, device=DEVICE)
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-4)
