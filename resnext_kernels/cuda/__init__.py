"""impl="cuda": the hand-written CUDA kernels of resnext_kernels._C (sources in csrc/)."""

from .._extension import BUILD_HINT, LOAD_ERROR


def unavailable_reason(device):
    if LOAD_ERROR is not None:
        return f"impl='cuda' needs the CUDA extension resnext_kernels._C, which was not built or failed to load ({LOAD_ERROR}). {BUILD_HINT}"
    if device.type != "cuda":
        return f"impl='cuda' runs on CUDA tensors, got a tensor on {device}"
    return "impl='cuda': the CUDA kernels are not implemented in this version of resnext_kernels yet"
