"""What a result was measured on: the device, the software versions and the code's commit."""

import datetime
import os
import pathlib
import platform
import re
import subprocess

import torch

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


def device_info(device):
    device = torch.device(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "memory_bytes": properties.total_memory,
            "l2_cache_bytes": getattr(properties, "L2_cache_size", None),
            "driver": _driver_version(),
        }
    return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}


def _driver_version():
    """The NVIDIA driver's version (clocks and kernels' behaviour can change with it), or None."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.split()
    return lines[0] if result.returncode == 0 and lines else None


def _cpu_name():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def versions():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "resnext_kernels": __version__,
    }


def commit():
    """{"sha", "short", "dirty"} of the checkout the package runs from. Where there is no git (a copy
    of the tree on a GPU machine), the environment variable RESNEXT_KERNELS_COMMIT may name it where
    the tree came from, as `$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty)`: the sha,
    "-dirty" marking uncommitted changes (a value of another form is kept as the sha, dirty unknown);
    otherwise all three are None."""
    def git(*args):
        try:
            result = subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True,
                                    timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        named = os.environ.get("RESNEXT_KERNELS_COMMIT", "").strip()
        if not named:
            return {"sha": None, "short": None, "dirty": None}
        match = re.fullmatch(r"([0-9a-f]{40})(-dirty)?", named)
        if match is None:
            return {"sha": named, "short": named[:7], "dirty": None}
        return {"sha": match[1], "short": match[1][:7], "dirty": match[2] is not None}
    # Tracked files only: a results file or build output left in the tree does not make the code dirty.
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "short": sha[:7], "dirty": bool(status)}


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def slug(text):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (safe in a file name)."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


def repository_results_dir():
    """benchmarks/results/ of the checkout the package runs from, or None (e.g. an installed wheel)."""
    folder = REPOSITORY / "benchmarks"
    return folder / "results" if folder.is_dir() else None
