import os
import zlib

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which reads TRITON_INTERPRET when a
# kernel is decorated: set it before any resnext_kernels module defining kernels is imported. The
# CUDA kernels likewise run through the host test build when it is present.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("RESNEXT_KERNELS_CUDA_EMULATE", "1")

import pytest  # noqa: E402

import resnext_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32 results are compared with float64 at fp32 accuracy: no TF32 in cuDNN's reference or in
# kernels that follow its setting.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
KERNEL_IMPLS = [impl for impl in resnext_kernels.available_impls(DEVICE) if impl != "torch"]


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only the I-th of N interleaved parts of the suite (0-based), for parallel runs: "
                          "on a GPU, compiling the Triton kernels' specialisations dominates the suite's time")


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard is None:
        return
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard {shard!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard {shard!r}: I must be in 0..N-1")
    config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % count != index])
    items[:] = items[index::count]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh inputs per test, yet reproducible when a failure must be replayed.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))

