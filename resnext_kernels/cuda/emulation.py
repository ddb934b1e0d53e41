"""The host test build: csrc/'s kernels compiled by the host compiler through the CUDA compatibility
layer (csrc/emulate/), so impl="cuda" runs their logic on CPU tensors. A test instrument, enabled by
RESNEXT_KERNELS_CUDA_EMULATE=1; built on first use into torch's extension cache."""

import functools
import hashlib
import os
import pathlib

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
NAMESPACE = "resnext_kernels_emulated"


def enabled():
    return os.environ.get("RESNEXT_KERNELS_CUDA_EMULATE") == "1"


def build_arguments(sanitize=False):
    """Arguments for torch.utils.cpp_extension.load: the same sources the nvcc build uses; with
    ``sanitize``, built with AddressSanitizer and alignment checks (run it with libasan preloaded)."""
    flags = ["-DRESNEXT_KERNELS_EMULATE", "-O2", "-g0"]
    ldflags = []
    if sanitize:
        # AddressSanitizer, and a misaligned vector access (an error on a GPU) as a fatal error too.
        sanitizers = ["-fsanitize=address,alignment", "-fno-sanitize-recover=alignment"]
        flags = ["-DRESNEXT_KERNELS_EMULATE", "-O1", "-g", "-fno-omit-frame-pointer", *sanitizers]
        ldflags = sanitizers
    sources = [CSRC / "ops.cpp", *sorted((CSRC / "emulate").glob("*.cpp"))]
    # torch's build cache only hashes the listed sources, not the headers they include: name the
    # build after every file under csrc/ so that any edit rebuilds it.
    digest = hashlib.sha1()
    for path in sorted(CSRC.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(CSRC).as_posix().encode() + path.read_bytes())
    return dict(
        name=f"{NAMESPACE}{'_asan' if sanitize else ''}_{digest.hexdigest()[:12]}",
        sources=[str(s) for s in sources],
        extra_include_paths=[str(CSRC)],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        is_python_module=False,
        verbose=False,
    )


@functools.cache
def load():
    """Builds (once per source change) and loads the host test build; returns None or why it can't."""
    if not (CSRC / "emulate").is_dir():
        return f"the host test build needs the source tree ({CSRC} is missing: install with pip install -e .)"
    from torch.utils.cpp_extension import load as load_extension

    try:
        load_extension(**build_arguments())
    except Exception as error:  # a compiler error is a finding, shown to whoever asked for impl="cuda"
        return f"the host test build failed to compile: {error}"
    return None
