"""The public API's contract: clear errors on bad input and on backends that cannot run."""

import functools
import importlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import resnext_kernels
from resnext_kernels import backends
from conftest import DEVICE, KERNEL_IMPLS
from helpers import Shape, make_case


def call(case, **overrides):
    kwargs = dict(stride=1, dilation=1, groups=case.shape.groups, training=True, impl="torch")
    kwargs.update(overrides)
    return resnext_kernels.grouped_conv_bn_relu(*case.tensors(), **kwargs)


def replaced(case, **tensors):
    args = dict(zip(("x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var"), case.tensors()))
    args.update(tensors)
    return args


SHAPE = Shape(2, 8, 8, 5, 5, groups=4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: dict(x=c.x[0]), "x must be 4-D"),
        (lambda c: dict(x=c.x.to(torch.int32)), "x must be float16"),
        (lambda c: dict(x=c.x[:, :, :0]), "non-empty spatial"),
        (lambda c: dict(x=torch.randn(2, 6, 5, 5)), "6 channels are not divisible by groups=4"),
        (lambda c: dict(x=c.x[:, :0], weight=c.weight[:, :0]), "x must have at least one channel"),
        (lambda c: dict(weight=c.weight[:, :1]), "weight must have shape"),
        (lambda c: dict(weight=torch.randn(8, 2, 5, 5)), "weight must have shape"),
        (lambda c: dict(weight=torch.randn(6, 2, 3, 3)), "weight must have shape"),
        (lambda c: dict(weight=c.weight[0]), "weight must have shape"),
        (lambda c: dict(weight=c.weight.double()), "weight's dtype"),
        (lambda c: dict(x=c.x.bfloat16(), weight=c.weight.bfloat16(), bn_weight=c.bn_weight.double()),
         "bn_weight has dtype"),
        (lambda c: dict(bn_bias=c.bn_bias.double()), "bn_bias has dtype"),
        (lambda c: dict(x=c.x.bfloat16(), weight=c.weight.bfloat16(), running_mean=c.running_mean.bfloat16()),
         "share one dtype"),
        (lambda c: dict(bn_weight=c.bn_weight[:4]), r"bn_weight must have shape \(8,\)"),
        (lambda c: dict(bn_bias=c.bn_bias[None]), "bn_bias must have shape"),
        (lambda c: dict(running_mean=torch.randn(9)), "running_mean must have shape"),
        (lambda c: dict(running_var=c.running_var[:1]), "running_var must have shape"),
        (lambda c: dict(running_var=None), "both be Tensors or both be None"),
        (lambda c: dict(bn_weight=[1.0] * 8), "bn_weight must be a Tensor or None"),
        (lambda c: dict(x=c.x.numpy()), "x must be a Tensor"),
        (lambda c: dict(weight=c.weight.to("meta")), "weight is on meta"),
        (lambda c: dict(running_mean=c.running_mean.to("meta")), "running_mean is on meta"),
    ],
)
def test_bad_tensors_raise_value_error_naming_the_argument(change, message):
    case = make_case(SHAPE, device="cpu")
    with pytest.raises(ValueError, match=message):
        resnext_kernels.grouped_conv_bn_relu(**replaced(case, **change(case)), groups=4, training=True)


def test_weight_on_another_device_is_named_under_autocast():
    # Autocast casts x and not the meta weight: the device is the error, not the dtypes it leads to.
    case = make_case(SHAPE, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="weight is on meta"):
        resnext_kernels.grouped_conv_bn_relu(**replaced(case, weight=case.weight.to("meta")), groups=4, training=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(stride=0), "stride must be >= 1"),
        (dict(stride=1.0), "stride must be an int"),
        (dict(stride=(1, 1)), "stride must be an int"),
        (dict(dilation=0), "dilation must be >= 1"),
        (dict(groups=0), "groups must be >= 1"),
        (dict(groups=True), "groups must be an int"),
        (dict(training=1), "training must be a bool"),
        (dict(training=np.bool_(True)), "training must be a bool, got numpy.bool"),
        (dict(momentum=None), "momentum must be a number"),
        (dict(eps=-1.0), "eps must be a non-negative number"),
        (dict(eps=0.0), "eps must be positive when training"),
        (dict(impl="cudnn"), "impl must be one of 'auto', 'torch', 'triton', 'cuda'"),
    ],
)
def test_bad_arguments_raise_value_error(overrides, message):
    case = make_case(SHAPE, device="cpu")
    with pytest.raises(ValueError, match=message):
        call(case, **overrides)


def test_eval_needs_running_stats():
    case = make_case(SHAPE, device="cpu")
    with pytest.raises(ValueError, match="required when training=False"):
        resnext_kernels.grouped_conv_bn_relu(*case.tensors()[:4], None, None, groups=4, training=False)


@pytest.mark.parametrize("shape", [Shape(1, 4, 4, 1, 1, groups=2), Shape(1, 4, 4, 2, 2, groups=2, stride=2)], ids=str)
def test_training_with_one_value_per_channel_is_refused_like_batch_norm(shape):
    case = make_case(shape, device="cpu")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        call(case, stride=shape.stride)
    call(case, stride=shape.stride, training=False)  # eval normalises with the running stats: fine


def test_auto_on_cpu_is_the_reference():
    assert backends.resolve("auto", torch.device("cpu")) is backends.reference


# A 46341 x 46341 image (2^31 + 84 681 pixels), and one of 2^30 x 1 pixels whose rows with the
# taps' reach (up to 3 * 2^30 with a dilation as long as the side) pass 2^31: expanded views with no
# memory behind them.
HUGE_IMAGES = [(1, 8, 46341, 46341), (1, 8, 2**30, 1)]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("size", HUGE_IMAGES, ids=str)
def test_images_beyond_32_bit_pixel_indexing_are_refused(impl, size):
    case = make_case(SHAPE, device=DEVICE)
    x = case.x[:1, :, :1, :1].expand(*size)
    with pytest.raises(NotImplementedError, match=r"images of more than 2\^31 - 1 pixels \(H x W\) or with a side"):
        resnext_kernels.grouped_conv_bn_relu(x, *case.tensors()[1:], groups=4, training=False, impl=impl)


def test_auto_leaves_images_beyond_32_bit_pixel_indexing_to_the_reference():
    assert backends.resolve("auto", torch.device("cuda"), image_pixels=2**31) is backends.reference
    assert backends.resolve("auto", torch.device("cuda"), image_side=2**30) is backends.reference


def test_cuda_on_cpu_tensors_says_why(monkeypatch):
    from resnext_kernels.cuda import emulation

    monkeypatch.setattr(emulation, "enabled", lambda: False)
    with pytest.raises(RuntimeError, match="impl='cuda' runs on CUDA tensors"):
        call(make_case(SHAPE, device="cpu"), impl="cuda")


def test_missing_extension_says_how_to_build(monkeypatch):
    import resnext_kernels.cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "LOAD_ERROR", "No module named 'resnext_kernels._C'")
    with pytest.raises(RuntimeError, match="was not built.*RESNEXT_KERNELS_BUILD_CUDA=1 pip install"):
        backends.resolve("cuda", torch.device("cuda"))


def test_a_build_from_older_sources_says_to_rebuild(monkeypatch):
    import resnext_kernels.cuda as cuda_backend
    from resnext_kernels.cuda.ops import register_namespace

    reason = register_namespace("resnext_kernels_never_built")  # a namespace without the ops
    assert reason.startswith("the built extension lacks the ops conv_bn_relu_folded, grouped_conv")
    assert "rebuild" in reason
    monkeypatch.setattr(cuda_backend, "LOAD_ERROR", None)
    monkeypatch.setattr(cuda_backend, "_STALE_BUILD", reason)
    with pytest.raises(RuntimeError, match="impl='cuda': the built extension lacks the ops"):
        backends.resolve("cuda", torch.device("cuda"))


def test_gpus_older_than_ampere_are_refused(monkeypatch):
    import resnext_kernels.cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "LOAD_ERROR", None)
    monkeypatch.setattr(cuda_backend, "_STALE_BUILD", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    too_old = functools.cache(cuda_backend._too_old.__wrapped__)
    monkeypatch.setattr(cuda_backend, "_too_old", too_old)  # a cache of this test's own
    for capability, reason in (((7, 5), "compute capability 8.0 or newer.*Tesla T4 is 7.5"), ((8, 0), None)):
        too_old.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        got = cuda_backend.unavailable_reason(torch.device("cuda", 0))
        assert got is None if reason is None else re.search(reason, got), got


def test_triton_on_cpu_without_the_interpreter_says_why():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, resnext_kernels\n"
        "x = torch.randn(2, 8, 5, 5); w = torch.randn(8, 2, 3, 3)\n"
        "try:\n"
        "    resnext_kernels.grouped_conv_bn_relu(x, w, None, None, None, None, groups=4, training=True,"
        " impl='triton')\n"
        "except RuntimeError as error:\n"
        "    print('RuntimeError:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "RuntimeError: impl='triton'" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("available, chosen", [(("cuda", "triton"), "cuda"), (("triton",), "triton"), ((), "torch")])
def test_auto_on_cuda_takes_the_fastest_available_backend(available, chosen, monkeypatch):
    def unavailable_reason(name, device):
        return None if name in available and backends._load(name)[0] is not None else "not available"

    monkeypatch.setattr(backends, "unavailable_reason", unavailable_reason)
    expected = backends.reference if chosen == "torch" else importlib.import_module(f"resnext_kernels.{chosen}")
    assert backends.resolve("auto", torch.device("cuda")) is expected
