"""Loads the compiled extension resnext_kernels._C, whose import registers torch.ops.resnext_kernels.*"""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from . import _C  # noqa: F401
except ImportError as error:  # built without CUDA, or a broken build: say which when the op is asked for
    LOAD_ERROR = str(error) or type(error).__name__
else:
    LOAD_ERROR = None

BUILD_HINT = (
    "Install with a CUDA toolkit (nvcc; CUDA_HOME) and a CUDA build of torch present; "
    "RESNEXT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e . fails loudly if it cannot build"
)
