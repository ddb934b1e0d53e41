"""Which backend runs a call: impl names to modules, availability and the choice behind "auto"."""

import importlib

import torch

from . import reference

# Fastest first: "auto" takes the first one available for the input's device.
_KERNEL_BACKENDS = {"cuda": "resnext_kernels.cuda", "triton": "resnext_kernels.triton"}
_MODULES = {"torch": reference}  # the backends imported so far
# The kernels index the pixels of one image in 32 bits (whole tensors in 64), and a row or column
# with its taps, side + 2 * dilation (dilation at most the side), too.
MAX_IMAGE_PIXELS = 2**31 - 1
MAX_IMAGE_SIDE = MAX_IMAGE_PIXELS // 3


def _load(impl):
    try:
        _MODULES[impl] = importlib.import_module(_KERNEL_BACKENDS[impl])
        return _MODULES[impl], None
    except ModuleNotFoundError as error:
        if error.name != _KERNEL_BACKENDS[impl]:
            raise
        return None, f"impl={impl!r} is not implemented in this version of resnext_kernels"


def unavailable_reason(impl, device):
    """None when ``impl`` can run tensors on ``device``, else a sentence saying why not and what to do."""
    if impl == "torch":
        return None
    module, reason = _load(impl)
    return reason if module is None else module.unavailable_reason(device)


def resolve(impl, device, image_pixels=1, image_side=1):
    """The backend module for ``impl``; RuntimeError when it cannot run on ``device``.

    "auto" takes the fastest backend that runs on ``device`` and images of ``image_pixels`` input
    pixels with a longest side of ``image_side``; an explicitly named kernel backend raises
    NotImplementedError where it cannot."""
    name = _resolve_name(impl, device)
    # Outside _resolve_name: a symbolic size (torch.compile, dynamic shapes) is no constant; these
    # tests become guards on it.
    if name != "torch" and (image_pixels > MAX_IMAGE_PIXELS or image_side > MAX_IMAGE_SIDE):
        if impl == "auto":
            return reference
        raise NotImplementedError(f"impl={impl!r}: images of more than 2^31 - 1 pixels (H x W) or with a side "
                                  f"longer than {MAX_IMAGE_SIDE} are not supported; impl='torch' runs them")
    return _MODULES[name]


# torch.compile runs the choice once while tracing (it imports modules and probes builds) and keeps
# the name it returns as a constant of the graph.
@torch.compiler.assume_constant_result
def _resolve_name(impl, device):
    if impl == "auto":
        if device.type != "cuda":
            return "torch"
        for name in _KERNEL_BACKENDS:
            if unavailable_reason(name, device) is None:
                return name
        return "torch"
    reason = unavailable_reason(impl, device)
    if reason is not None:
        raise RuntimeError(reason)
    return impl


def available_impls(device):
    """The concrete impls that can run on ``device``, reference first."""
    return ["torch"] + [name for name in reversed(list(_KERNEL_BACKENDS)) if unavailable_reason(name, device) is None]
