"""benchmarks/gpu_check.sh, run here with stand-ins for the GPU machine's tools: what a lent GPU
must not be the first to find (a typo, an unset variable, more files than the device tool brings back)."""

import os
import pathlib
import re
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The device tool brings back at most this many files from $OUT, at most two folders down.
MAX_FILES_BACK = 8

# Stands for the device image's python3 (and nvcc, nvidia-smi, compute-sanitizer): records its
# arguments; a benchmark writes its three results files where --out says, as the real one does.
STUB_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >>"$STUB_CALLS"
args=" $* "
if [[ $args == *" -c "* ]]; then echo "torch 2.11.0 cuda 13.0 cudnn 91000 triton 3.6.0 device NVIDIA H200"; exit 0; fi
if [[ $args == *" pip "* ]]; then echo "resnext_kernels: building the CUDA extension"; exit 0; fi
if [[ $args == *" pytest "* ]]; then
  for a in "$@"; do [[ $a == --junitxml=* ]] && echo "<testsuites/>" >"${a#--junitxml=}"; done
  echo "tests/test_a.py::test_b PASSED"; echo "1 passed in 0.01s"; exit 0
fi
if [[ $args == *" --out "* ]]; then
  out=${args#* --out }; out=${out%% *}
  mkdir -p "$out"
  for ext in json md png; do echo stub >"$out/2026-11-29T10-00-00-nvidia-h200-0123456.$ext"; done
  printf '%s\n' "### Against the issues' targets" "" "| target | provider | met | worst |" "|---|---|---|---|" \
    "| stub target | cuda | 7/7 | x |"
fi
echo "stub done"
"""
STUB_TOOL = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >>"$STUB_CALLS"
if [[ $(basename "$0") == compute-sanitizer && $1 != --version ]]; then echo "========= ERROR SUMMARY: 0 errors"; fi
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script itself runs")
def test_gpu_check_brings_back_what_the_device_tool_can(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("python3", STUB_PYTHON), ("nvcc", STUB_TOOL), ("nvidia-smi", STUB_TOOL),
                       ("compute-sanitizer", STUB_TOOL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), STUB_CALLS=str(calls),
               TMPDIR=str(tmp_path), HOME=str(tmp_path), GPU_CHECK_SECONDS="120", RESNEXT_KERNELS_COMMIT="0" * 40)
    env.pop("CUDA_HOME", None)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unbound variable" not in result.stderr and "command not found" not in result.stderr, result.stderr

    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= MAX_FILES_BACK, files
    assert all(len(f.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in f.parts) for f in files)
    assert sorted(f.suffix for f in files if f.parts[0] == "results") == [".json", ".md", ".png"]

    summary = (out / "summary.txt").read_text()
    assert summary in result.stdout and "| stub target | cuda | 7/7 | x |" in summary
    steps = dict(line.split(": ", 1) for line in summary.split("-- steps --\n")[1].splitlines())
    assert list(steps) == ["build", "tests", "memcheck", "racecheck", "synccheck", "selfcheck", "warm_ops",
                           "warm_batch", "bench_ops", "bench_batch"]
    assert all(status.startswith("exit 0 after") for status in steps.values()), summary
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = {pathlib.Path(name).name for name in logs.getnames()}
    assert {"environment.txt", "build.log", "tests-0.log", "tests-7.xml", "racecheck.log"} <= names

    invoked = calls.read_text().splitlines()
    shards = sorted(line.split("--shard ")[1].split()[0] for line in invoked if "-m pytest" in line)
    assert shards == sorted(f"{i}/8" for i in range(8))
    sanitized = [line for line in invoked if line.startswith("compute-sanitizer --error-exitcode")]
    assert len(sanitized) == 3 and all("--report-api-errors no" in line for line in sanitized)
    assert "nvcc --version" in invoked  # the CUDA toolkit found from the nvcc on the PATH


@pytest.mark.skipif(torch.cuda.is_available(), reason="five pytest processes: the CPU CI's job, not the GPU check's")
def test_gpu_check_shards_partition_the_suite():
    # benchmarks/gpu_check.sh runs the suite as interleaved parts in parallel (--shard I/N): together
    # they must run every test exactly once.
    def collected(*extra):
        result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_api.py", "--collect-only", "-q", *extra],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return [line for line in result.stdout.splitlines() if "::" in line]

    everything = collected()
    parts = [collected("--shard", f"{i}/3") for i in range(3)]
    assert len(everything) > 3 and all(parts)
    assert sorted(sum(parts, [])) == sorted(everything)
    bad = subprocess.run([sys.executable, "-m", "pytest", "tests/test_api.py", "--collect-only", "-q", "--shard", "3/3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "I must be in 0..N-1" in bad.stderr
