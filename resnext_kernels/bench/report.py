"""The results document (JSON), its schema and checks, and what is made from it: markdown tables and a
PNG chart.

Schema, version 2 (every time in the unit its name says; GB/s = 1e9 bytes/s; version 1 had no op
field, its records all grouped_conv_bn_relu's):

    schema_version  2
    date            ISO 8601 UTC time the run started
    device          {type: "cuda"|"cpu", name, ...: capability, multiprocessors, memory_bytes, l2_cache_bytes, driver}
    versions        {python, torch, triton, cuda, cudnn, resnext_kernels} (None where absent)
    commit          {sha, short, dirty} (None without git; dirty: tracked files differ from sha)
    settings        {ops: {...}, batches: {...}}: what each section ran (sizes, dtypes, timing options)
    copy_bandwidth  {bytes, median_us, gbps}: a large device-to-device copy, (read + written) / time
    selfcheck       {dtype, passed, failed_impls} or None when skipped
    ops             [op record]: one per (op, layer, n, dtype, layout, mode, provider)
        op (shapes.OPS), layer (the grouped layer's id, naming the block), shape (grouped_conv_bn_relu:
        {model, stage, first, c_in, h, w, c_out, groups, stride, repeats, id, h_out, w_out}; the BatchNorm
        ops: {channels, h, w, residual}), n, dtype, layout, mode, provider, status
        ("ok"|"unsupported"|"skipped"|"error"), reason, bytes (shapes.op_bytes, shapes.batch_norm_bytes),
        flops (shapes.op_flops; 0 for the BatchNorm ops), floor_us (bytes / copy bandwidth),
        median_us, p20_us, p80_us, reps, gbps, tflops (None without FLOPs), fraction_of_floor (floor_us / median_us),
        speedup_vs_eager, speedup_vs_compile (baseline time / this time), compile_s,
        kernels (optional; kernel providers on a GPU): [{name, calls, us, ours}], each kernel the op
        launches, with its launches and device time per call, longest first; ours: one of the fused
        ops' own kernels (not a copy, fill or PyTorch kernel)
    batches         [batch record]: one per (model, mode, provider)
        model, mode ("train"|"inference"), provider, n, image_size, dtype, layout, status, reason,
        median_ms, p20_ms, p80_ms, reps, images_per_s, peak_memory_bytes (None on a CPU), compile_s,
        kernel_ms, fused_ms, kernels (training steps of batch.PROFILED_MODELS on a GPU, else None):
        device time of one step in all kernels and in the fused ops' own, and its longest kernels as in
        an op record
    ratios          [{resnext, resnet, mode, provider ("best": each model's fastest), resnext_provider,
                      resnet_provider, resnext_ms, resnet_ms, ratio, paper_ratio (None: the paper has none)}]
    interrupted     true when the run was stopped before its end (what had finished is kept)

Figures of a record whose status is not "ok" are None.
"""

import json
import math
import pathlib
import sys

from . import environment, shapes
from .shapes import MODE_LABELS, OP_LABELS

SCHEMA_VERSION = 2
STATUSES = ("ok", "unsupported", "skipped", "error")
PROVIDER_LABELS = {"eager": "eager cuDNN", "compile": "torch.compile", "triton": "triton", "cuda": "cuda",
                   "best": "fastest of each"}


def provider_label(provider, device_type="cuda"):
    if provider == "eager" and device_type != "cuda":
        return "eager (CPU)"
    return PROVIDER_LABELS.get(provider, provider)

_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
_OPTIONAL_STR = (str, type(None))

TOP_FIELDS = {
    "schema_version": int, "date": str, "device": dict, "versions": dict, "commit": dict, "settings": dict,
    "copy_bandwidth": (dict, type(None)), "selfcheck": (dict, type(None)), "ops": list, "batches": list,
    "ratios": list, "interrupted": bool,
}
DEVICE_FIELDS = {"type": str, "name": str}
VERSION_FIELDS = {"python": str, "torch": str, "triton": _OPTIONAL_STR, "cuda": _OPTIONAL_STR,
                  "cudnn": (int, type(None)), "resnext_kernels": str}
COMMIT_FIELDS = {"sha": _OPTIONAL_STR, "short": _OPTIONAL_STR, "dirty": (bool, type(None))}
COPY_FIELDS = {"bytes": int, "median_us": _NUMBER, "gbps": _NUMBER}
OP_FIELDS = {
    "op": str, "layer": str, "shape": dict, "n": int, "dtype": str, "layout": str, "mode": str, "provider": str,
    "status": str, "reason": _OPTIONAL_STR, "bytes": int, "flops": int, "floor_us": _OPTIONAL_NUMBER,
    "median_us": _OPTIONAL_NUMBER, "p20_us": _OPTIONAL_NUMBER, "p80_us": _OPTIONAL_NUMBER,
    "reps": (int, type(None)), "gbps": _OPTIONAL_NUMBER, "tflops": _OPTIONAL_NUMBER,
    "fraction_of_floor": _OPTIONAL_NUMBER, "speedup_vs_eager": _OPTIONAL_NUMBER,
    "speedup_vs_compile": _OPTIONAL_NUMBER, "compile_s": _OPTIONAL_NUMBER,
}
# "kernels", a list of these: optional in an op record (results written before it existed lack it),
# None or a list in a batch record.
KERNEL_FIELDS = {"name": str, "calls": _NUMBER, "us": _NUMBER, "ours": bool}
OP_OK_FIELDS = ("median_us", "p20_us", "p80_us", "reps", "gbps")
BATCH_FIELDS = {
    "model": str, "mode": str, "provider": str, "n": int, "image_size": int, "dtype": str, "layout": str,
    "status": str, "reason": _OPTIONAL_STR, "median_ms": _OPTIONAL_NUMBER, "p20_ms": _OPTIONAL_NUMBER,
    "p80_ms": _OPTIONAL_NUMBER, "reps": (int, type(None)), "images_per_s": _OPTIONAL_NUMBER,
    "peak_memory_bytes": (int, type(None)), "compile_s": _OPTIONAL_NUMBER, "kernel_ms": _OPTIONAL_NUMBER,
    "fused_ms": _OPTIONAL_NUMBER, "kernels": (list, type(None)),
}
BATCH_OK_FIELDS = ("median_ms", "p20_ms", "p80_ms", "reps", "images_per_s")
RATIO_FIELDS = {"resnext": str, "resnet": str, "mode": str, "provider": str, "resnext_provider": str,
                "resnet_provider": str, "resnext_ms": _NUMBER, "resnet_ms": _NUMBER, "ratio": _NUMBER,
                "paper_ratio": _OPTIONAL_NUMBER}


def new_document(device, *, date=None, commit=None, versions=None):
    return {
        "schema_version": SCHEMA_VERSION,
        "date": date or environment.now_utc(),
        "device": environment.device_info(device),
        "versions": versions or environment.versions(),
        "commit": commit or environment.commit(),
        "settings": {},
        "copy_bandwidth": None,
        "selfcheck": None,
        "ops": [],
        "batches": [],
        "ratios": [],
        "interrupted": False,
    }


# ---------------------------------------------------------------------------------------------- checks

def validate(doc):
    """The list of ways ``doc`` breaks the schema (empty when it conforms)."""
    problems = []
    if not isinstance(doc, dict):
        return ["the document is not a JSON object"]
    _check_fields(doc, TOP_FIELDS, "", problems)
    if doc.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version is {doc.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    for name, fields in (("device", DEVICE_FIELDS), ("versions", VERSION_FIELDS), ("commit", COMMIT_FIELDS)):
        if isinstance(doc.get(name), dict):
            _check_fields(doc[name], fields, f"{name}.", problems)
    if isinstance(doc.get("copy_bandwidth"), dict):
        _check_fields(doc["copy_bandwidth"], COPY_FIELDS, "copy_bandwidth.", problems)
    for section, fields, ok_fields in (("ops", OP_FIELDS, OP_OK_FIELDS), ("batches", BATCH_FIELDS, BATCH_OK_FIELDS)):
        for index, record in enumerate(doc.get(section) or []):
            where = f"{section}[{index}]."
            if not isinstance(record, dict):
                problems.append(f"{where[:-1]} is not an object")
                continue
            _check_fields(record, fields, where, problems)
            kernels = record.get("kernels")
            if kernels is not None and not isinstance(kernels, list):
                problems.append(f"{where}kernels is {type(kernels).__name__}, expected list or null")
                kernels = []
            for k, kernel in enumerate(kernels or []):
                if isinstance(kernel, dict):
                    _check_fields(kernel, KERNEL_FIELDS, f"{where}kernels[{k}].", problems)
                else:
                    problems.append(f"{where}kernels[{k}] is not an object")
            status = record.get("status")
            if status not in STATUSES:
                problems.append(f"{where}status is {status!r}, expected one of {STATUSES}")
            elif status == "ok":
                required = ok_fields + (("tflops",) if record.get("op") == "grouped_conv_bn_relu" else ())
                problems += [f"{where}{f} is missing for status 'ok'" for f in required if record.get(f) is None]
            elif not record.get("reason"):
                problems.append(f"{where}reason is empty for status {status!r}")
    for index, record in enumerate(doc.get("ratios") or []):
        if isinstance(record, dict):
            _check_fields(record, RATIO_FIELDS, f"ratios[{index}].", problems)
        else:
            problems.append(f"ratios[{index}] is not an object")
    try:
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as error:
        problems.append(f"not serialisable as strict JSON: {error}")
    return problems


def check(doc):
    problems = validate(doc)
    if problems:
        raise ValueError("the results document breaks schema version "
                         f"{SCHEMA_VERSION}:\n  " + "\n  ".join(problems))
    return doc


def _check_fields(obj, fields, where, problems):
    for name, types in fields.items():
        if name not in obj:
            problems.append(f"{where}{name} is missing")
            continue
        value = obj[name]
        types = types if isinstance(types, tuple) else (types,)
        # bool is an int to Python, but never a valid number or count here.
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{where}{name} is {type(value).__name__}, expected {expected}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}{name} is {value}")


# -------------------------------------------------------------------------------------- files, merging

def result_stem(doc):
    """<date>-<device>-<short commit>, the name of a run's files (benchmarks/results/ convention)."""
    return f"{doc['date'][:10]}-{environment.slug(doc['device']['name'])}-{doc['commit'].get('short') or 'nocommit'}"


def merge(new, old):
    """``new`` completed with the sections it lacks from ``old``, when both come from one device and one
    commit (the per-op and per-batch runs of one GPU check are two processes writing one result)."""
    same_origin = (old.get("schema_version") == new["schema_version"]
                   and old.get("device", {}).get("name") == new["device"]["name"]
                   and old.get("commit", {}).get("sha") == new["commit"]["sha"])
    if not same_origin:
        return new
    merged = dict(new, settings=dict(new["settings"]))
    taken = False
    if not new["ops"] and old.get("ops"):
        merged["ops"] = old["ops"]
        merged["settings"]["ops"] = old.get("settings", {}).get("ops")
        merged["copy_bandwidth"] = old.get("copy_bandwidth")  # the ops' memory floors were taken from it
        taken = True
    if not new["batches"] and old.get("batches"):
        merged["batches"] = old["batches"]
        merged["ratios"] = old.get("ratios", [])
        merged["settings"]["batches"] = old.get("settings", {}).get("batches")
        taken = True
    if new["selfcheck"] is None:
        merged["selfcheck"] = old.get("selfcheck")
    merged["interrupted"] = bool(new["interrupted"] or (taken and old.get("interrupted")))
    merged["settings"] = {k: v for k, v in merged["settings"].items() if v is not None}
    return merged


def write_json(doc, path, strict=True):
    """Writes ``doc`` to ``path``, merged with what a same-device, same-commit run left there; returns
    the document written. ``strict``: refuse a document that breaks the schema (the main job passes
    False after reporting the problems, so that a GPU run's figures are never lost to a harness bug)."""
    path = pathlib.Path(path)
    if path.exists():
        try:
            doc = merge(doc, json.loads(path.read_text()))
        except (ValueError, OSError):
            pass  # an unreadable old file is replaced
    if strict:
        check(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=strict) + "\n")
    return doc


def write_outputs(doc, folder, strict=True):
    """<stem>.json, <stem>.md and (with matplotlib) <stem>.png in ``folder``; returns (paths, notes)."""
    folder = pathlib.Path(folder)
    stem = result_stem(doc)
    doc = write_json(doc, folder / f"{stem}.json", strict)
    paths = [folder / f"{stem}.json"]
    (folder / f"{stem}.md").write_text(render_markdown(doc) + "\n")
    paths.append(folder / f"{stem}.md")
    chart, note = save_chart(doc, folder / f"{stem}.png")
    notes = [note] if note else []
    if chart:
        paths.append(chart)
    return paths, notes


def newest_gpu_result(folder):
    """(path, document) of the newest GPU result in ``folder`` by its date, or (None, None)."""
    newest = (None, None)
    for path in sorted(pathlib.Path(folder).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (ValueError, OSError) as error:
            print(f"skipped {path}: {error}", file=sys.stderr)
            continue
        problems = validate(doc)
        if problems:
            print(f"skipped {path}: {'; '.join(problems)}", file=sys.stderr)
            continue
        if doc["device"]["type"] != "cuda":
            continue
        if newest[1] is None or (doc["date"], path.name) > (newest[1]["date"], newest[0].name):
            newest = (path, doc)
    return newest


# ---------------------------------------------------------------------------------------------- tables

def _fmt(value, digits=1, scale=1.0, suffix=""):
    if value is None:
        return "–"
    return f"{value * scale:,.{digits}f}{suffix}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _not_run_notes(records, key_fields, device_type):
    """One line per distinct (provider, status, reason): which cases did not run, and why."""
    groups = {}
    for r in records:
        if r["status"] != "ok":
            groups.setdefault((r["provider"], r["status"], r["reason"]), []).append(
                " ".join(str(r[f]) for f in key_fields))
    lines = []
    for (provider, status, reason), cases in groups.items():
        which = ", ".join(dict.fromkeys(cases)) if len(cases) <= 4 else f"{len(cases)} cases"
        lines.append(f"- {provider_label(provider, device_type)}: {status} ({which}): {reason}")
    return lines


def render_header(doc):
    device, v, commit = doc["device"], doc["versions"], doc["commit"]
    software = f"torch {v['torch']}, triton {v['triton'] or 'absent'}"
    if device["type"] == "cuda":
        software += f", CUDA {v['cuda']}, cuDNN {v['cudnn']}, driver {device.get('driver') or 'unknown'}"
    revision = "unknown commit" if not commit.get("short") else (
        f"commit {commit['short']}" + (" with local changes" if commit.get("dirty") else ""))
    lines = [f"**{device['name']}** ({device['type']}) · {software} · {revision} · {doc['date']}"]
    if device["type"] != "cuda":
        lines.append("")
        lines.append("No GPU: these are CPU timings of the eager PyTorch reference only, not GPU figures.")
    bandwidth = doc.get("copy_bandwidth")
    if bandwidth:
        lines.append("")
        lines.append(f"Copy bandwidth {bandwidth['gbps']:,.0f} GB/s ({bandwidth['bytes'] / 2 ** 30:g} GiB copy, "
                     "bytes read + written over time, measured in this run)"
                     + (": the memory floors below use it." if doc["ops"] else "."))
    if doc.get("interrupted"):
        lines.append("")
        lines.append("The run was interrupted; only what had finished is shown.")
    return "\n".join(lines)


def render_batches(doc, heading="###"):
    records = doc["batches"]
    if not records:
        return ""
    s = doc["settings"].get("batches", {})
    gpu = doc["device"]["type"] == "cuda"
    precision = f"{s.get('dtype')} autocast" if s.get("dtype") in ("bfloat16", "float16") else s.get("dtype")
    out = [f"{heading} Per batch: one training step (forward, backward, SGD step) and one inference forward",
           "",
           f"N={s.get('n')}, {s.get('image_size')}x{s.get('image_size')} synthetic images, {precision}, "
           f"{s.get('layout')}{', --quick' if s.get('quick') else ''}. Median per batch; "
           + ("peak memory is torch.cuda.max_memory_allocated over the case (model, optimizer state, activations)."
              if gpu else "peak memory is not measured on a CPU."),
           ""]
    by_key = {(r["model"], r["provider"], r["mode"]): r for r in records}
    models = list(dict.fromkeys(r["model"] for r in records))
    providers = list(dict.fromkeys(r["provider"] for r in records))
    rows = []
    for model in models:
        for provider in providers:
            train, infer = by_key.get((model, provider, "train")), by_key.get((model, provider, "inference"))
            if not any(r and r["status"] == "ok" for r in (train, infer)):
                continue
            cells = [model, provider_label(provider, doc["device"]["type"])]
            for r in (train, infer):
                if r is None or r["status"] != "ok":
                    cells += [r["status"] if r else "–", "", ""]
                    continue
                peak = _fmt(r["peak_memory_bytes"], 2, 1 / 2 ** 30) if gpu else "n/a"
                rate_digits = 0 if r["images_per_s"] >= 100 else 1
                cells += [_fmt(r["median_ms"]), _fmt(r["images_per_s"], rate_digits), peak]
            rows.append(cells)
    out.append(_table(["model", "provider", "train ms", "train images/s", "train peak GiB",
                       "inference ms", "inference images/s", "inference peak GiB"], rows))
    notes = _not_run_notes(records, ("model", "mode"), doc["device"]["type"])
    if notes:
        out += ["", "Not run:"] + notes
    if doc.get("ratios"):
        out += ["", f"{heading}# ResNeXt / ResNet time per batch "
                    "(the paper: 0.95 s / 0.70 s = 1.36 for the 101-layer pair)",
                ""]
        rows = []
        for r in doc["ratios"]:
            provider = provider_label(r["provider"], doc["device"]["type"])
            if r["provider"] == "best":
                provider += f" ({r['resnext_provider']} / {r['resnet_provider']})"
            rows.append([f"{r['resnext']} / {r['resnet']}", r["mode"], provider, _fmt(r["resnext_ms"]),
                         _fmt(r["resnet_ms"]), _fmt(r["ratio"], 2),
                         _fmt(r["paper_ratio"], 2) if r["paper_ratio"] else "–"])
        out.append(_table(["pair", "mode", "provider", "ResNeXt ms", "ResNet ms", "ratio", "paper"], rows))
    breakdown = render_step_breakdown(doc, heading)
    if breakdown:
        out += ["", breakdown]
    return "\n".join(out)


def _clip(name, length=60):
    # cuDNN's and CUTLASS's kernel names run to hundreds of characters of template arguments.
    return name if len(name) <= length else name[:length - 1] + "…"


def render_step_breakdown(doc, heading="###"):
    """Where one training step's GPU time goes, the fused ops' kernels apart, and what that bounds."""
    records = [r for r in doc["batches"] if r["status"] == "ok" and r["mode"] == "train" and r.get("kernel_ms")]
    if not records:
        return ""
    rows = []
    for r in records:
        others = [k for k in r["kernels"] if not k["ours"]][:3]
        rows.append([r["model"], provider_label(r["provider"]), _fmt(r["median_ms"]), _fmt(r["kernel_ms"]),
                     _fmt(r["fused_ms"]), _fmt(r["fused_ms"] / r["median_ms"], 0, 100, "%"),
                     "; ".join(f"{_clip(k['name'])} {k['us'] / 1e3:.1f}" for k in others)])
    out = [f"{heading}# Where a training step's GPU time goes",
           "",
           "One step under torch.profiler: device time in all kernels and in the fused ops' own (grouped "
           "conv + BN + ReLU and the other BatchNorms + ReLU, forward and backward), in ms, beside the "
           "median step; a step longer than its "
           "kernels waited on the host. The longest other kernels are listed with their ms.",
           "",
           _table(["model", "provider", "step ms", "kernels ms", "fused-op kernels ms", "of the step",
                   "longest other kernels"], rows)]
    baseline = next((r for r in doc["batches"] if r["status"] == "ok" and r["mode"] == "train"
                     and (r["model"], r["provider"]) == ("resnet50", "eager")), None)
    bounds = [f"{r['provider']}: {(r['median_ms'] - r['fused_ms']) / baseline['median_ms']:.2f}" for r in records
              if baseline and r["model"] == "resnext50_32x4d" and r["provider"] in ("triton", "cuda")]
    if bounds:
        out += ["", "ResNeXt-50's step less its fused-op kernel time, over ResNet-50's eager step (the ratio the "
                f"fused ops could reach by taking no time at all; the target is <= {_STEP_TARGET}): "
                + ", ".join(bounds) + "."]
    return "\n".join(out)


def _op_label(record):
    return OP_LABELS.get(record["op"], record["op"])


def _shape_label(record):
    shape = record["shape"]
    if record["op"] == "grouped_conv_bn_relu":
        return (f"{shape['c_in']}x{shape['h']}² → {shape['c_out']}x{shape['h_out']}², "
                f"g{shape['groups']}, s{shape['stride']}")
    return f"{shape['channels']}x{shape['h']}x{shape['w']}" + (" + residual" if shape["residual"] else "")


def render_ops(doc, heading="###"):
    records = doc["ops"]
    if not records:
        return ""
    s = doc["settings"].get("ops", {})
    out = [f"{heading} Per op: the fused ops in ResNeXt's blocks",
           "",
           f"N={s.get('n')}{', --quick' if s.get('quick') else ''}. The block (by its grouped layer) and the part "
           "of it: the grouped layer (grouped_conv_bn_relu), bn1 + relu and bn3 + add + relu (batch_norm_relu). "
           "Median time; floor = the fewest bytes (one read of each input, one write of each output, two reads "
           "where BatchNorm's statistics must come first; see shapes.op_bytes and shapes.batch_norm_bytes) over "
           "the copy bandwidth; % floor = floor / time (100% = at the memory roofline); speed-ups = "
           "baseline time / this time.",
           ""]
    rows = []
    for r in records:
        if r["status"] != "ok":
            continue
        rows.append([
            r["layer"], _op_label(r), _shape_label(r),
            r["dtype"], r["layout"], MODE_LABELS.get(r["mode"], r["mode"]),
            provider_label(r["provider"], doc["device"]["type"]),
            _fmt(r["median_us"]), _fmt(r["floor_us"]), _fmt(r["fraction_of_floor"], 0, 100, "%"),
            _fmt(r["gbps"], 0), _fmt(r["tflops"], 2),
            _fmt(r["speedup_vs_eager"], 2, suffix="×"), _fmt(r["speedup_vs_compile"], 2, suffix="×"),
        ])
    out.append(_table(["block", "op", "shape", "dtype", "layout", "mode", "provider", "µs", "floor µs", "% floor",
                       "GB/s", "TFLOP/s", "vs eager", "vs compile"], rows))
    notes = _not_run_notes(records, ("layer", "op", "dtype", "layout", "mode"), doc["device"]["type"])
    if notes:
        out += ["", "Not run:"] + notes
    return "\n".join(out)


def render_kernels(doc, heading="###"):
    rows = []
    for r in doc["ops"]:
        if r["status"] != "ok" or not r.get("kernels"):
            continue
        listed = "; ".join(f"{k['name']} {k['us']:.1f}" + (f" (×{k['calls']:g})" if k["calls"] != 1 else "")
                           for k in r["kernels"])
        rows.append([r["layer"], _op_label(r), r["dtype"], r["layout"], MODE_LABELS.get(r["mode"], r["mode"]),
                     provider_label(r["provider"], doc["device"]["type"]), _fmt(r["median_us"]),
                     _fmt(sum(k["us"] for k in r["kernels"])), listed])
    if not rows:
        return ""
    return "\n".join([
        f"{heading} Per kernel",
        "",
        "Device time per call of each kernel the op launches, in µs (torch.profiler; inputs rotating but the "
        "L2 not flushed), beside the op's median from the table above: a kernel far from its share of the "
        "floor is the one to work on.",
        "",
        _table(["block", "op", "dtype", "layout", "mode", "provider", "op µs", "kernels µs", "kernels"], rows),
    ])


# The issues' performance targets for grouped_conv_bn_relu on the ResNeXt layer shapes in bf16, channels_last:
# (criterion, mode, providers, the value of a record given every provider's record of its case, the
# least value that meets it, how it is shown).
_OP_TARGETS = (
    ("inference >= 85% of the copy floor", "inference", ("triton", "cuda"), lambda r, _: r["fraction_of_floor"],
     0.85, "%"),
    ("inference faster than eager cuDNN", "inference", ("cuda",), lambda r, _: r["speedup_vs_eager"], 1.0, "×"),
    ("inference faster than torch.compile", "inference", ("cuda",), lambda r, _: r["speedup_vs_compile"], 1.0, "×"),
    ("train fwd+bwd >= 2x eager cuDNN", "train_fwd_bwd", ("triton", "cuda"), lambda r, _: r["speedup_vs_eager"],
     2.0, "×"),
    ("train fwd+bwd >= 1.5x torch.compile", "train_fwd_bwd", ("triton", "cuda"),
     lambda r, _: r["speedup_vs_compile"], 1.5, "×"),
    ("train fwd+bwd faster than triton", "train_fwd_bwd", ("cuda",),
     lambda r, case: case["triton"]["median_us"] / r["median_us"] if "triton" in case else None, 1.0, "×"),
)
# The whole training step: ResNeXt-50 with a kernel backend against ResNet-50 in eager cuDNN.
_STEP_TARGET = 1.05
# Where the issues set their targets: ResNeXt-50's seven grouped layers (and its training step) at N=128.
TARGET_MODEL = "resnext50_32x4d"
TARGET_N = 128


def _target_layers():
    return [layer.id for layer in shapes.model_layers(TARGET_MODEL)]


def target_rows(doc):
    """[criterion, provider, layers that meet it / ResNeXt-50's layers, the worst measured layer and its
    value]. A layer meets a target only when it was measured and met it: an error, an unsupported or
    skipped case, or one this run left out counts against the target, named as "not measured". Only
    for GPU runs that timed the grouped layer in the mode a criterion needs."""
    if doc["device"]["type"] != "cuda":
        return []
    layers = _target_layers()
    records = [r for r in doc["ops"] if r["op"] == "grouped_conv_bn_relu" and r["dtype"] == "bfloat16"
               and r["layout"] == "channels_last" and r["layer"] in layers]
    modes = {r["mode"] for r in records}
    by_case = {}
    for r in records:
        if r["status"] == "ok":
            by_case.setdefault((r["layer"], r["mode"]), {})[r["provider"]] = r
    rows = []
    for criterion, mode, providers, value_of, least, unit in _OP_TARGETS:
        if mode not in modes:
            continue
        for provider in providers:
            values = []
            for layer in layers:
                case = by_case.get((layer, mode), {})
                value = value_of(case[provider], case) if provider in case else None
                if value is not None:
                    values.append((value, layer))
            met = sum(v >= least for v, _ in values)
            missing = len(layers) - len(values)
            shown = "–"
            if values:
                worst, layer = min(values)
                shown = f"{layer}: " + (f"{100 * worst:.0f}%" if unit == "%" else f"{worst:.2f}×")
            rows.append([criterion, provider, f"{met}/{len(layers)}" + (f" ({missing} not measured)" if missing else ""),
                         shown])
    steps = {(r["model"], r["provider"]): r for r in doc["batches"] if r["mode"] == "train"}
    baseline = steps.get(("resnet50", "eager"))
    for provider in ("triton", "cuda"):
        ours = steps.get((TARGET_MODEL, provider))
        if ours is None and baseline is None:
            continue
        criterion = f"ResNeXt-50 train step <= {_STEP_TARGET}x ResNet-50 eager"
        if ours is None or baseline is None or ours["status"] != "ok" or baseline["status"] != "ok":
            rows.append([criterion, provider, "0/1 (1 not measured)", "–"])
            continue
        ratio = ours["median_ms"] / baseline["median_ms"]
        rows.append([criterion, provider, f"{int(ratio <= _STEP_TARGET)}/1", f"{ratio:.2f}×"])
    return rows


def acceptance_caveats(doc):
    """How this run differs from the issues' setting (N=128, all seven layers in inference and training
    forward+backward, the training steps at N=128), in words; empty when it does not."""
    caveats = []
    convolutions = [r for r in doc["ops"] if r["op"] == "grouped_conv_bn_relu"]
    if not convolutions:
        caveats.append("no per-op runs of the grouped layer")
    else:
        ops_n = doc["settings"].get("ops", {}).get("n")
        if ops_n != TARGET_N:
            caveats.append(f"the per-op runs used N={ops_n}")
        layers = set(_target_layers())
        measured = {r["layer"] for r in convolutions}
        if not layers <= measured:
            caveats.append(f"{len(layers & measured)} of ResNeXt-50's {len(layers)} layers were run")
        modes = {r["mode"] for r in convolutions}
        caveats += [f"no {MODE_LABELS[mode]} runs" for mode in ("inference", "train_fwd_bwd") if mode not in modes]
    batch_n = doc["settings"].get("batches", {}).get("n")
    if not any(r["mode"] == "train" for r in doc["batches"]):
        caveats.append("no training steps")
    elif batch_n != TARGET_N:
        caveats.append(f"the training steps used N={batch_n}")
    return caveats


def render_targets(doc, heading="###"):
    rows = target_rows(doc)
    if not rows:
        return ""
    caveats = acceptance_caveats(doc)
    scope = ("Not an acceptance run: " + "; ".join(caveats) + f" (the issues: N={TARGET_N}, every layer)."
             if caveats else f"The issues' setting: N={TARGET_N}, every layer of ResNeXt-50.")
    check = doc.get("selfcheck")
    if check is None:
        scope += (" The kernels' self-check against float64 is not part of this result (gpu_check.sh runs it "
                  "as a step of its own): a target counts once the kernels are shown correct.")
    elif not check["passed"]:
        scope += (f" **The self-check FAILED ({', '.join(check['failed_impls']) or 'see above'}): these figures "
                  "do not count.**")
    return "\n".join([
        f"{heading} Against the issues' targets",
        "",
        f"bf16, channels_last, ResNeXt-50's grouped layers on {doc['device']['name']}: how many layers meet "
        "each target (a layer not measured, or that failed, does not), and the worst measured one. " + scope,
        "",
        _table(["target", "provider", "met", "worst"], rows),
    ])


def render_markdown(doc, heading="###"):
    parts = [render_header(doc), render_targets(doc, heading), render_batches(doc, heading), render_ops(doc, heading),
             render_kernels(doc, heading)]
    return "\n\n".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------- chart

def save_chart(doc, path):
    """A PNG of the per-batch throughput and the per-op fraction of the memory floor. Returns (path,
    None), or (None, why not) when matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "no PNG chart: matplotlib is not installed (pip install 'resnext_kernels[bench]')"
    panels = _batch_panels(doc) + _op_panels(doc)
    if not panels:
        return None, "no PNG chart: no successful measurement to draw"
    figure, axes = plt.subplots(len(panels), 1, figsize=(11, 3.4 * len(panels)), squeeze=False)
    for axis, (title, ylabel, groups, series) in zip(axes[:, 0], panels):
        width = 0.8 / max(1, len(series))
        for index, (label, values) in enumerate(series.items()):
            xs = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
            axis.bar(xs, [v if v is not None else 0 for v in values], width, label=label)
        axis.set_xticks(range(len(groups)))
        axis.set_xticklabels(groups, rotation=15, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.set_ylabel(ylabel)
        if ylabel.startswith("%"):
            axis.axhline(100, color="black", linewidth=0.8, linestyle="--", label="memory floor")
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{doc['device']['name']} · {doc['date'][:10]} · {doc['commit'].get('short') or ''}", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path, None


def _batch_panels(doc):
    panels = []
    for mode in ("train", "inference"):
        records = [r for r in doc["batches"] if r["mode"] == mode and r["status"] == "ok"]
        if not records:
            continue
        models = list(dict.fromkeys(r["model"] for r in records))
        providers = list(dict.fromkeys(r["provider"] for r in records))
        value = {(r["model"], r["provider"]): r["images_per_s"] for r in records}
        series = {provider_label(p, doc["device"]["type"]): [value.get((m, p)) for m in models] for p in providers}
        n = records[0]["n"]
        panels.append((f"per batch, {'training step' if mode == 'train' else 'inference'} (N={n})",
                       "images/s", models, series))
    return panels


def _op_panels(doc):
    records = [r for r in doc["ops"] if r["status"] == "ok" and r["fraction_of_floor"] is not None]
    if not records:
        return []
    # One dtype and layout: the headline one when present.
    combos = list(dict.fromkeys((r["dtype"], r["layout"]) for r in records))
    dtype, layout = ("bfloat16", "channels_last") if ("bfloat16", "channels_last") in combos else combos[0]
    panels = []
    for mode in MODE_LABELS:
        chosen = [r for r in records if r["mode"] == mode and r["dtype"] == dtype and r["layout"] == layout]
        if not chosen:
            continue
        layers = list(dict.fromkeys(_case_label(r) for r in chosen))
        providers = list(dict.fromkeys(r["provider"] for r in chosen))
        value = {(_case_label(r), r["provider"]): 100 * r["fraction_of_floor"] for r in chosen}
        series = {provider_label(p, doc["device"]["type"]): [value.get((layer, p)) for layer in layers]
                  for p in providers}
        panels.append((f"per op, {MODE_LABELS[mode]}, {dtype}, {layout}, N={chosen[0]['n']}",
                       "% of memory floor", layers, series))
    return panels


def _case_label(record):
    if record["op"] == "grouped_conv_bn_relu":
        return record["layer"]
    return f"{record['layer']} {_op_label(record)}"
