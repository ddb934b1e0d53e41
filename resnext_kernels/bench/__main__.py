"""python -m resnext_kernels.bench: the project's main job.

1. The correctness self-check: every backend available on the machine against float64, on a few
   small ResNeXt shapes (seconds). A backend that fails it is not benchmarked. --no-check skips it,
   --check-only runs nothing else.
2. The per-batch benchmark (the paper's comparison; the default) or, with --ops, the per-op benchmark
   (the grouped layer, then the block's bn1 + relu and bn3 + add + relu).
   --quick runs a short version (the GPU check's).
3. Results: on a GPU run from a checkout, benchmarks/results/<date>-<device>-<commit>.json (--no-save
   skips it); --out DIR writes that JSON, a markdown table and a PNG chart into DIR; --json FILE writes
   the JSON alone ("-": to stdout, the tables then going to stderr).

Without a GPU it says so and times only what runs there: the eager PyTorch reference on the CPU at a
small batch. It never prints a GPU figure it did not measure.

Exit status: 1 when the self-check fails, a benchmark case raises an error or the run is interrupted,
else 0.
"""

import argparse
import functools
import json
import signal
import sys
import traceback

import torch

from . import batch, environment, ops, report, shapes, timing
from .selfcheck import self_check

NO_GPU_MESSAGE = ("No CUDA GPU on this machine: the GPU benchmarks cannot run here, and no GPU figures are "
                  "shown. Timing what runs on the CPU instead: the eager PyTorch reference (float32, small "
                  "batch).")
SELFCHECK_FAILED = "failed the correctness self-check"


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, but still write what has finished."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m resnext_kernels.bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    what = parser.add_argument_group("what to run")
    what.add_argument("--ops", action="store_true", help="the per-op benchmark instead of the per-batch one")
    what.add_argument("--quick", action="store_true", help="a short version: few shapes, one dtype and layout, "
                      "N=32 per batch, no torch.compile per batch, short timing")
    what.add_argument("--check-only", action="store_true", help="only the correctness self-check")
    what.add_argument("--no-check", action="store_true", help="skip the correctness self-check")
    what.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                      help="auto: the GPU when there is one")
    sizes = parser.add_argument_group("narrowing or resizing (defaults depend on --ops, --quick and the device)")
    sizes.add_argument("--dtype", choices=list(ops.DTYPES), default=None,
                       help="the one dtype of the self-check (default float32) and the benchmarks "
                            "(default: per op bfloat16 and float16, per batch bfloat16 autocast; float32 on a CPU)")
    sizes.add_argument("--batch-size", type=int, default=None, help="N (default per op 128, per batch 128, "
                       "32 with --quick; 2 on a CPU)")
    sizes.add_argument("--image-size", type=int, default=None,
                       help="per batch (default 224; on a CPU 128, 96 with --quick)")
    sizes.add_argument("--models", default=None, help=f"per batch, comma-separated (default {','.join(batch.MODELS)})")
    sizes.add_argument("--layers", default=None,
                       help="per op, comma-separated layer ids or parts of them, e.g. resnext50,stage4")
    sizes.add_argument("--layouts", default=None,
                       help=f"comma-separated, of {','.join(ops.LAYOUTS)} (per batch: the first one)")
    sizes.add_argument("--modes", default=None, help=f"comma-separated; per op: {','.join(shapes.MODES)}; "
                       f"per batch: {','.join(batch.MODES)}")
    sizes.add_argument("--providers", default=None, help=f"comma-separated, of {','.join(ops.PROVIDERS)} "
                       "(default: all that run on the device)")
    sizes.add_argument("--budget-s", type=float, default=None,
                       help="stop starting new cases after this many seconds (the rest are recorded as skipped); "
                            "with --ops, torch.compile gets half of it. Default: none on a GPU, 30 on a CPU")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default=None, help="folder for the JSON, markdown and PNG of this run")
    output.add_argument("--json", default=None, help="file for the JSON alone ('-': stdout)")
    output.add_argument("--no-save", action="store_true", help="on a GPU, do not write benchmarks/results/")
    return parser.parse_args(argv)


def _split(text, allowed, what):
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise SystemExit(f"error: unknown {what} {unknown or text!r}; choose from {', '.join(allowed)}")
    return items


def choose_device(choice):
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA device is available")
    return torch.device("cuda", torch.cuda.current_device())


def _providers(args, device, exclude=()):
    available = ops.providers_for(device)
    if args.providers:
        wanted = _split(args.providers, ops.PROVIDERS, "provider")
        # A named provider the device lacks is kept: its record then says why it could not run.
        available = [p for p in ops.PROVIDERS if p in wanted and (device.type == "cuda" or p == "eager")]
    return [p for p in available if p not in exclude]


def op_settings(args, device):
    gpu = device.type == "cuda"
    layers = shapes.find_layers(shapes.QUICK_LAYER_IDS) if args.quick else shapes.op_layers()
    batch_norm_layers = shapes.find_layers(shapes.QUICK_BATCH_NORM_LAYER_IDS) if args.quick else layers
    if args.layers:
        parts = [p.strip() for p in args.layers.split(",") if p.strip()]
        layers = batch_norm_layers = [layer for layer in shapes.op_layers() if any(p in layer.id for p in parts)]
        if not layers:
            raise SystemExit(f"error: no layer id contains any of {parts}")
    if args.dtype:
        dtypes = [args.dtype]
    else:
        dtypes = ["float32"] if not gpu else ["bfloat16"] if args.quick else ["bfloat16", "float16"]
    layouts = (_split(args.layouts, list(ops.LAYOUTS), "layout") if args.layouts
               else ["channels_last"] if args.quick or not gpu else list(ops.LAYOUTS))
    modes = _split(args.modes, shapes.MODES, "mode") if args.modes else list(shapes.MODES)
    if gpu:
        timing_options = (dict(warmup_s=0.05, rep_s=0.15, min_reps=10, max_reps=100) if args.quick
                          else dict(warmup_s=0.1, rep_s=0.5, min_reps=20, max_reps=300))
    else:
        timing_options = dict(warmup_s=0.0, rep_s=0.1, min_warmup_calls=1, min_reps=3, max_reps=10)
    budget = args.budget_s if args.budget_s is not None else (None if gpu else 30.0)
    return {
        "quick": args.quick,
        "n": args.batch_size or (128 if gpu else 2),
        "layers": [layer.id for layer in layers],
        "batch_norm_layers": [layer.id for layer in batch_norm_layers],
        "dtypes": dtypes,
        "layouts": layouts,
        "modes": modes,
        "providers": _providers(args, device),
        "timing": timing_options,
        "budget_s": budget,
        "compile_budget_s": None if budget is None else budget / 2,
    }


def batch_settings(args, device):
    gpu = device.type == "cuda"
    models = _split(args.models, batch.MODELS, "model") if args.models else list(batch.MODELS)
    modes = _split(args.modes, batch.MODES, "mode") if args.modes else list(batch.MODES)
    layout = _split(args.layouts, list(ops.LAYOUTS), "layout")[0] if args.layouts else "channels_last"
    # Compiling four whole models takes minutes: not in a quick run unless asked for by name.
    exclude = ("compile",) if args.quick and not args.providers else ()
    if gpu:
        n = args.batch_size or (32 if args.quick else 128)
        timing_options = (dict(warmup_s=0.2, rep_s=0.5, min_reps=5, max_reps=30) if args.quick
                          else dict(warmup_s=1.0, rep_s=3.0, min_reps=10, max_reps=100))
    else:
        n = args.batch_size or 2
        timing_options = dict(warmup_s=0.0, rep_s=0.5, min_warmup_calls=1, min_reps=2, max_reps=5)
    return {
        "quick": args.quick,
        "n": n,
        # A CPU run only shows the harness working: smaller images keep it well under a minute.
        "image_size": args.image_size or (224 if gpu else 96 if args.quick else 128),
        "models": models,
        "modes": modes,
        "dtype": args.dtype or ("bfloat16" if gpu else "float32"),
        "layout": layout,
        "providers": _providers(args, device, exclude),
        "timing": timing_options,
        "budget_s": args.budget_s if args.budget_s is not None else (None if gpu else 30.0),
    }


def run_self_check(device, dtype, say):
    """Prints the self-check table; returns (passed, impls that failed)."""
    failed, cases = set(), 0
    say(f"self-check ({dtype}, against float64):")
    say(f"  {'impl':<8} {'shape':<22} {'mode':<6} {'rel. error':>11}  result")
    try:
        for impl, shape, mode, error, passed in self_check(device, ops.DTYPES[dtype]):
            cases += 1
            if not passed:
                failed.add(impl)
            say(f"  {impl:<8} {shape:<22} {mode:<6} {error:>11.2e}  {'ok' if passed else 'FAIL'}")
    except Exception as error:  # noqa: BLE001 - report it as a failed check, not a crash
        say(f"  self-check raised {type(error).__name__}: {error}")
        return False, sorted(failed)
    say("self-check passed" if not failed else f"self-check FAILED: {', '.join(sorted(failed))}")
    return not failed, sorted(failed)


def main(argv=None):
    args = parse_args(argv)
    say = functools.partial(print, file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
    log = functools.partial(print, file=sys.stderr, flush=True)  # progress, one line per case
    device = choose_device(args.device)
    gpu = device.type == "cuda"
    v = environment.versions()
    if gpu:
        say(f"device: {torch.cuda.get_device_name(device)}, torch {v['torch']}, triton {v['triton']}, "
            f"CUDA {v['cuda']}, cuDNN {v['cudnn']}")
    elif torch.cuda.is_available():
        say(f"device: CPU (--device cpu), torch {v['torch']}: CPU timings of the eager reference only, no GPU figures.")
    else:
        say(NO_GPU_MESSAGE)
    # Settings first: a misspelt name fails at once, not after the self-check.
    settings = op_settings(args, device) if args.ops else batch_settings(args, device)

    check_passed, check_failed = True, []
    if not args.no_check:
        check_passed, check_failed = run_self_check(device, args.dtype or "float32", say)
        if args.check_only:
            return 0 if check_passed else 1
        say("")

    threads = torch.get_num_threads()
    if not gpu:
        # One thread: on a CPU shared with other work (CI runners, 2-core development machines) OpenMP
        # threads oversubscribe and a run took 3x longer than single-threaded. Restored on return.
        torch.set_num_threads(1)
    try:
        return _benchmark(args, device, settings, say, log, check_passed, check_failed)
    finally:
        torch.set_num_threads(threads)


def _benchmark(args, device, settings, say, log, check_passed, check_failed):
    gpu = device.type == "cuda"
    doc = report.new_document(device)
    if not args.no_check:
        doc["selfcheck"] = {"dtype": args.dtype or "float32", "passed": check_passed, "failed_impls": check_failed}
    excluded = {impl: SELFCHECK_FAILED for impl in check_failed if impl in ops.KERNEL_PROVIDERS}
    doc["settings"]["ops" if args.ops else "batches"] = dict(settings, cudnn_benchmark=True)

    def stop(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    try:
        previous_handler, installed = signal.signal(signal.SIGTERM, stop), True
    except ValueError:  # not the main thread: no handler, and nothing to restore
        previous_handler, installed = None, False
    # cuDNN picks its algorithms by timing them, as a tuned training script asks it to: the baselines at
    # their best (the warm-ups absorb the search).
    cudnn_benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    try:
        doc["copy_bandwidth"] = timing.copy_bandwidth(device)
        deadline = timing.Deadline(settings["budget_s"])
        if args.ops:
            cases = ops.block_op_cases(shapes.find_layers(settings["layers"]),
                                       shapes.find_layers(settings["batch_norm_layers"]), settings["n"],
                                       settings["dtypes"], settings["layouts"], settings["modes"])
            log(f"per op: {len(cases)} cases x providers {', '.join(settings['providers'])}")
            ops.run_ops(cases, settings["providers"], device, timing_options=settings["timing"],
                        bandwidth_gbps=doc["copy_bandwidth"]["gbps"], deadline=deadline,
                        compile_deadline=timing.Deadline(settings["compile_budget_s"]), excluded=excluded,
                        log=log, records=doc["ops"])
        else:
            cases = batch.batch_cases(settings["models"], settings["modes"], settings["n"], settings["image_size"],
                                      settings["dtype"], settings["layout"])
            log(f"per batch: {len(cases)} cases x providers {', '.join(settings['providers'])}")
            batch.run_batches(cases, settings["providers"], device, timing_options=settings["timing"],
                              deadline=deadline, excluded=excluded, log=log, records=doc["batches"])
    except (Interrupted, KeyboardInterrupt) as why:
        log(f"interrupted ({why or 'KeyboardInterrupt'}): writing what has finished")
        doc["interrupted"] = True
    except Exception:  # noqa: BLE001 - e.g. a kernel fault that leaves the CUDA context unusable
        log(f"stopped by an error, writing what has finished:\n{traceback.format_exc()}")
        doc["interrupted"] = True
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_handler is None else previous_handler)
    ops.add_speedups(doc["ops"])
    doc["ratios"] = batch.time_ratios(doc["batches"])
    problems = report.validate(doc)
    for problem in problems:  # a harness bug: reported, and the figures still written
        say(f"schema problem: {problem}")

    say(report.render_markdown(doc))
    write_results(doc, args, gpu, say, strict=not problems)
    errors = sum(r["status"] == "error" for r in doc["ops"] + doc["batches"])
    if errors:
        say(f"{errors} case(s) raised an error (see 'Not run' above)")
    return 1 if errors or problems or not check_passed or doc["interrupted"] else 0


def write_results(doc, args, gpu, say, strict=True):
    written = []
    if gpu and not args.no_save:
        folder = environment.repository_results_dir()
        if folder is None:
            say("not saved to benchmarks/results/: the package does not run from a checkout")
        else:
            path = folder / f"{report.result_stem(doc)}.json"
            report.write_json(doc, path, strict)
            written.append(path)
    if args.out:
        paths, notes = report.write_outputs(doc, args.out, strict)
        written += paths
        for note in notes:
            say(note)
    if args.json == "-":
        print(json.dumps(doc, indent=1, allow_nan=not strict))
    elif args.json:
        report.write_json(doc, args.json, strict)
        written.append(args.json)
    if written:
        say("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    sys.exit(main())
