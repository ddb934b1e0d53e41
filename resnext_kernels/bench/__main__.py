"""python -m resnext_kernels.bench: the project's main job.

Checks every backend available on this machine against float64 and prints the table; exits
non-zero if any check fails. The timing tables arrive with the benchmark suite.
"""

import argparse
import sys

import torch

from .selfcheck import self_check


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m resnext_kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda")
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        device = torch.device("cpu")
        print(f"device: no CUDA device on this machine; checking the backends that run on the CPU (torch {torch.__version__})")

    failures = 0
    print(f"{'impl':<8} {'shape':<22} {'mode':<6} {'rel. error':>11}  result")
    for impl, shape, mode, error, passed in self_check(device, getattr(torch, args.dtype)):
        failures += not passed
        print(f"{impl:<8} {shape:<22} {mode:<6} {error:>11.2e}  {'ok' if passed else 'FAIL'}")
    print("self-check passed" if not failures else f"self-check FAILED: {failures} case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
