"""The compiled extension and the main job's entry point."""

import os

import pytest
import torch

from resnext_kernels import _extension
from resnext_kernels.bench.__main__ import main as bench_main


def toolkit_present():
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return torch.version.cuda is not None and os.path.isfile(os.path.join(cuda_home, "bin", "nvcc"))


@pytest.mark.skipif(not toolkit_present(), reason="no CUDA toolkit and CUDA build of torch: the extension is optional")
def test_extension_is_built_and_loads_where_a_toolkit_is_present():
    # CI has nvcc and a CUDA build of torch but no GPU: this proves the real build path ran.
    assert _extension.LOAD_ERROR is None
    assert hasattr(torch.ops, "resnext_kernels")


def test_main_job_self_check_passes(capsys):
    assert bench_main(["--check-only"]) == 0
    out = capsys.readouterr().out
    assert "self-check passed" in out and "torch" in out and "bn 2x512x7x7 +res" in out
