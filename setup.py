"""Builds resnext_kernels and, when a CUDA toolkit and a CUDA build of torch are present, its
extension ``resnext_kernels._C`` from every source under ``csrc/``.

No GPU needs to be visible. Settings come from the environment only:

  RESNEXT_KERNELS_BUILD_CUDA  0: skip the extension; 1: build it or fail; unset: build when possible
  TORCH_CUDA_ARCH_LIST        target architectures (default: the visible GPUs'; 8.0;9.0+PTX without
                              one, or with one older than 8.0, which the kernels do not support)
  MAX_JOBS                    parallel compile jobs (ninja)
  CUDA_HOME                   toolkit root (default: /usr/local/cuda when it exists)
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

# torch guesses CUDA_HOME from nvcc's location (/usr/local on our machines) and then cannot link
# cudart, so name the toolkit before torch.utils.cpp_extension reads the environment.
if not os.environ.get("CUDA_HOME") and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _sources(*patterns):
    return sorted(
        os.path.relpath(path, ROOT)
        for pattern in patterns
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )


def _cuda_build_decision():
    """Returns (build, reason). Raises when the build is forced but impossible."""
    flag = os.environ.get("RESNEXT_KERNELS_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"RESNEXT_KERNELS_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False, "RESNEXT_KERNELS_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        problem = "torch is not installed in the build environment (use --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            problem = f"torch {torch.__version__} is not a CUDA build"
        elif CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
            problem = "no CUDA toolkit found (set CUDA_HOME)"
        else:
            return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}"
    if flag == "1":
        raise SystemExit(f"RESNEXT_KERNELS_BUILD_CUDA=1 but the extension cannot be built: {problem}")
    return False, problem


def _extension_modules():
    build, reason = _cuda_build_decision()
    if not build:
        print(f"resnext_kernels: building WITHOUT the CUDA extension ({reason}); impl='cuda' will be unavailable")
        return [], {}

    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # torch's own default is the visible GPUs' architectures; one before 8.0 (no cp.async, no bf16
    # mma.sync) would fail the whole build, where the default still builds (impl="cuda" then says why not).
    visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and (not visible or min(visible) < (8, 0)):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    use_ninja = shutil.which("ninja") is not None
    print(
        "resnext_kernels: building the CUDA extension: "
        f"{reason}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPU)')}, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}, ninja={'yes' if use_ninja else 'no'}"
    )
    extension = CUDAExtension(
        name="resnext_kernels._C",
        sources=_sources("csrc/*.cpp", "csrc/cuda/*.cpp", "csrc/cuda/*.cu"),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
