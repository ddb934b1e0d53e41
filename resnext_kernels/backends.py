"""Which backend runs a call: impl names to modules, availability and the choice behind "auto"."""

import importlib

from . import reference

# Fastest first: "auto" takes the first one available for the input's device.
_KERNEL_BACKENDS = {"cuda": "resnext_kernels.cuda", "triton": "resnext_kernels.triton"}


def _load(impl):
    try:
        return importlib.import_module(_KERNEL_BACKENDS[impl]), None
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


def resolve(impl, device):
    """The backend module for ``impl``; RuntimeError when it cannot run on ``device``."""
    if impl == "auto":
        if device.type != "cuda":
            return reference
        for name in _KERNEL_BACKENDS:
            if unavailable_reason(name, device) is None:
                return _load(name)[0]
        return reference
    if impl == "torch":
        return reference
    reason = unavailable_reason(impl, device)
    if reason is not None:
        raise RuntimeError(reason)
    return _load(impl)[0]


def available_impls(device):
    """The concrete impls that can run on ``device``, reference first."""
    return ["torch"] + [name for name in reversed(list(_KERNEL_BACKENDS)) if unavailable_reason(name, device) is None]
