"""What is particular to the CUDA backend: its compiled code, its host test build, its registration.

The numerical checks of impl="cuda" live with every backend's in test_functional.py and
test_modules.py; on a CPU machine they run the kernels through the host test build."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import resnext_kernels
from conftest import DEVICE, KERNEL_IMPLS
from helpers import Shape, make_case

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
EMULATION_PY = str(pathlib.Path(resnext_kernels.__file__).parent / "cuda" / "emulation.py")
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None)
needs_cuda_backend = pytest.mark.skipif("cuda" not in KERNEL_IMPLS, reason="impl='cuda' cannot run here")


def ops():
    return getattr(torch.ops, "resnext_kernels" if DEVICE.type == "cuda" else "resnext_kernels_emulated")


@pytest.mark.skipif(NVCC is None, reason="no nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(p.name for p in (CSRC / "cuda").glob("*.cu")))
def test_kernels_use_no_local_memory_and_never_spill(source, arch):
    result = subprocess.run(
        [NVCC, "-std=c++17", "-O3", f"-arch={arch}", f"-I{CSRC}", "--expt-relaxed-constexpr", "-Xptxas", "-v",
         "-c", str(CSRC / "cuda" / source), "-o", os.devnull],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = result.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert kernels and len(frames) == len(kernels), report
    for kernel, counts in zip(kernels, frames):
        assert counts == ("0", "0", "0"), f"{kernel}: {counts[0]} B stack frame, {counts[1]}/{counts[2]} B spills"


@needs_cuda_backend
def test_opcheck_inference_op():
    case = make_case(Shape(2, 16, 16, 5, 4, groups=4, stride=2))
    scale, shift = torch.rand(16, device=DEVICE) + 0.5, torch.randn(16, device=DEVICE)
    for x in (case.x, case.x.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(ops().conv_bn_relu_folded.default, (x, case.weight, scale, shift, 2, 1, 4))


@needs_cuda_backend
def test_compiles_without_graph_breaks():
    block = resnext_kernels.ResNeXtBlock(64, 16, groups=8, impl="cuda").to(DEVICE).eval()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 64, 5, 5, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x))


@needs_cuda_backend
def test_output_is_written_everywhere():
    # The host build poisons shared memory with NaN; here the output is checked for unwritten
    # elements too, on a shape where tiles overhang the image on every side.
    case = make_case(Shape(3, 96, 96, 11, 9, groups=24))
    scale, shift = torch.ones(96, device=DEVICE), torch.full((96,), 0.5, device=DEVICE)  # relu(y + 0.5): rarely 0
    z = ops().conv_bn_relu_folded(case.x, case.weight, scale, shift, 1, 1, 24)
    assert not z.isnan().any()


@pytest.mark.skipif(DEVICE.type != "cpu" or "cuda" not in KERNEL_IMPLS, reason="needs the host test build")
def test_address_sanitizer_catches_an_out_of_bounds_read_in_a_kernel():
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip("gcc has no AddressSanitizer runtime")
    # The probe loads emulation.py on its own: importing the package would import torch._dynamo and
    # triton, whose extension aborts under the sanitizer's runtime.
    probe = (
        "import importlib.util, torch\n"
        "from torch.utils.cpp_extension import load\n"
        f"spec = importlib.util.spec_from_file_location('emulation', {EMULATION_PY!r})\n"
        "emulation = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(emulation)\n"
        "load(**emulation.build_arguments(sanitize=True))\n"
        "ops = torch.ops.resnext_kernels_emulated\n"
        "x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 2, 3, 3)\n"
        "ops.conv_bn_relu_folded(x, w, torch.ones(8), torch.zeros(8), 1, 1, 4)\n"
        "print('in-bounds launch passed', flush=True)\n"
        "ops.read_past_the_end(x, w, 4)\n"
        "print('out-of-bounds read went unnoticed', flush=True)\n"
    )
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert "in-bounds launch passed" in output, output[-3000:]
    assert "out-of-bounds read went unnoticed" not in output
    assert "ERROR: AddressSanitizer" in output and "conv_bn_relu_folded" in output, output[-3000:]
    assert result.returncode != 0
