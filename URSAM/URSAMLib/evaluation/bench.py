"""``ursam bench``: what a segment run costs on this machine, every figure measured side by side.

One call measures, in one process and in interleaved rounds so that a busy
machine hits every path alike:

- with a template library: the whole case first, as a user runs it, in a
  fresh process (``ursam segment --templates``): wall and CPU seconds of
  each stage from its report.json, and the start-up before the run began
  (interpreter, imports); then the whole case in this process (localization,
  the deformable stage, SAM, outputs) and the seconds per support of the
  affine registration and of the deformable stage;
- the encoder per slice on each encoder path (eager and the fast ones), with
  its speed-up over eager in wall and in CPU time;
- the decoder per box, fast and eager, on the slice with the most boxes;
- two whole segment runs (SAM, rectification and every output file) with 1
  and with n augmented boxes, on the default path, and the encoder calls
  they made (one per distinct slice, whatever the organs and boxes);
- one more whole run per other encoder path, whose masks give each path's
  largest per-organ Dice difference from the eager path (against labels);
- the process's peak resident memory and its CPU seconds.

It prints a short summary, then one JSON object as its last line.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import pipeline
from ..errors import URSAMError
from ..imageio import read_ct, read_labels
from ..localizers import BoxSource, LibrarySource
from ..metrics import dice
from ..outputs import write_results
from ..progress import Progress
from ..prompt_augmentation import augment_box, organ_rngs
from ..runner import ScanJob, run_scan
from ..sam.backends import one_torch_thread
from ..sam.fast_encoder import AUTO_ORDER, available_paths
from ..segment import segment

#: masks whose Dice is compared between encoder paths
DICE_METHODS = (pipeline.AUTO, pipeline.ENSEMBLE, pipeline.URSAM)


def peak_rss_mb():
    """Peak resident memory of this process in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _spread(items, k):
    """Up to ``k`` items spread evenly over ``items``."""
    if len(items) <= k:
        return list(items)
    idx = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in sorted(set(idx))]


def encoder_ms(backends, volume, zs, rounds):
    """Per encoder path, medians over interleaved rounds: wall ms per slice, and CPU ms per slice.

    The CPU time is taken with torch at one thread (ONNX Runtime keeps its
    non-spinning pool): on a shared machine it is the figure that other
    processes disturb least, and no idle thread's spinning is counted.
    """
    wall = {name: [] for name in backends}
    cpu = {name: [] for name in backends}
    for b in backends.values():  # first call: allocations, thread pools, ONNX session warm-up
        b.embed(volume[zs[0]])
    for _ in range(rounds):
        for z in zs:
            for name, b in backends.items():
                wall[name].append(_timed(lambda: b.embed(volume[z]))[0] * 1e3)
            with one_torch_thread():
                for name, b in backends.items():
                    c0 = time.process_time()
                    b.embed(volume[z])
                    cpu[name].append((time.process_time() - c0) * 1e3)
    med = statistics.median
    return ({name: round(med(v), 1) for name, v in wall.items()},
            {name: round(med(v), 1) for name, v in cpu.items()})


def _slice_prompts(volume, boxes, params):
    """The pipeline's prompts on the slice with the most organs: boxes (K, 4) and their regions."""
    shape = volume.shape
    counts = {}
    for b in boxes:
        for z in b.z_range:
            counts[z] = counts.get(z, 0) + 1
    z = max(counts, key=lambda k: (counts[k], -k))
    rngs = organ_rngs(params.seed, [b.label for b in boxes])
    prompts, regions = [], []
    for b in boxes:
        aug = augment_box(b.xyxy(), params.n_aug, params.ratio, (shape[2], shape[1]), rngs[b.label])
        if z not in b.z_range:
            continue
        sl, _ = pipeline._region(b, shape, params.region_pad)
        for box in [b.xyxy()] + list(aug):
            prompts.append(box)
            regions.append((sl[1], sl[2]))
    return z, np.asarray(prompts, np.float32), regions


def decoder_ms_per_box(backend, volume, boxes, params, rounds):
    """Milliseconds per box of the fast and the eager decoder (None where a path is missing)."""
    z, prompts, regions = _slice_prompts(volume, boxes, params)
    emb = backend.embed(volume[z])
    paths = ["eager"] + (["fast"] if backend.decoder_name == "fast" else [])
    samples = {p: [] for p in paths}
    try:
        for p in paths:  # warm-up, and the per-slice preparation of the fast path
            backend.use_decoder(p)
            backend.decode_regions(emb, prompts, regions, batch=params.decode_batch)
        for _ in range(rounds):
            for p in paths:
                backend.use_decoder(p)
                samples[p].append(_timed(lambda: backend.decode_regions(
                    emb, prompts, regions, batch=params.decode_batch))[0])
    finally:
        if "fast" in paths:
            backend.use_decoder("fast")
    out = {p: round(statistics.median(v) * 1e3 / len(prompts), 2) for p, v in samples.items()}
    return out, len(prompts), z


def whole_run(outcome, backend, settings, out_root, tag):
    """SAM, rectification and every output file on a scan already read, localized and warped (``outcome``:
    a :class:`URSAMLib.runner.ScanOutcome`): the later steps of a run, as ``run_scan`` takes them."""
    calls0 = backend.encoder_calls
    c0, t0 = time.process_time(), time.perf_counter()
    canonical = outcome.canonical
    boxes = [canonical.box_to_canonical(b) for b in outcome.localization.boxes]
    result = segment(canonical, boxes, outcome.warped, backend, settings, progress=Progress(quiet=True)).result
    write_results(result, Path(out_root) / tag, overwrite=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    result.timings["encoder_calls"] = backend.encoder_calls - calls0  # this run's, not the backend's total
    return seconds, cpu, backend.encoder_calls - calls0, result


def organ_dice(result, labels):
    """{method: {organ name: Dice vs labels}} for the methods compared between paths."""
    out = {}
    for method in DICE_METHODS:
        lm = result.label_map(method)
        out[method] = {o.name: round(float(dice(lm == o.label, labels == o.label)), 4)
                       for o in result.main_organs()}
    return out


def mask_agreement(a, b):
    """Smallest per-organ Dice between the masks of two runs (1.0: identical)."""
    worst = 1.0
    for method in DICE_METHODS:
        la, lb = a.label_map(method), b.label_map(method)
        for o in a.main_organs():
            ma, mb = la == o.label, lb == o.label
            if ma.any() or mb.any():
                worst = min(worst, float(dice(ma, mb)))
    return round(worst, 5)


def expand_encoders(encoders, available):
    """The paths to measure: ``all`` is eager, auto and every fast path this installation has."""
    out = []
    for name in encoders:
        for n in (["eager", "auto"] + list(available)) if name == "all" else [name]:
            if n not in out:
                out.append(n)
    return out


def registration_record(outcome, settings):
    """Seconds per support of the affine registration (and its stages) and of the deformable stage."""
    localization = outcome.localization
    regs = localization.registrations or []
    deformable = outcome.warped.info().get("deformable", {}) if outcome.warped is not None else {}
    per = deformable.get("seconds_per_support", {})
    out = {"supports": len(regs),
           "affine_seconds_per_support": {r.case_id: round(r.seconds, 2) for r in regs},
           "affine_stage_seconds": {r.case_id: {k: round(v, 2) for k, v in r.stages.items()} for r in regs},
           "deformable": settings.deformable.method,
           "deformable_seconds_per_support": per,
           "localize_seconds": localization.info.get("seconds"),
           "localize_cpu_seconds": localization.info.get("registration_cpu_seconds"),
           "deformable_seconds": deformable.get("seconds")}
    if regs:
        out["affine_seconds_mean"] = round(statistics.mean(r.seconds for r in regs), 2)
    if per:
        out["deformable_seconds_mean"] = round(statistics.mean(per.values()), 2)
    return out


#: the run's stages in report.json's timings (``<stage>_seconds``, ``<stage>_cpu_seconds``), in run order
STAGES = (("read", "read the scan"), ("localize", "localize (affine registrations)"),
          ("warp", "warp the supports (deformable stage, priors)"), ("model", "load the SAM model"),
          ("segment", "SAM, fusion, rectification"), ("quality", "quality estimate"), ("write", "write the outputs"))


def fresh_case(image, templates, cli_args, out):
    """``ursam segment IMAGE --templates LIB`` in a fresh process: ``{"wall_seconds", "cpu_seconds", "stages"}``
    with each stage's ``[wall, CPU]`` seconds from its report.json and the start-up (what passed before
    the run began: the interpreter, the imports, reading the arguments, and the exit after it).
    ``cli_args``: more options of ``ursam segment``."""
    cmd = [sys.executable, "-m", "URSAMLib.cli", "segment", str(image), "--templates", str(templates), "--out",
           str(out), "--quiet", *cli_args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise URSAMError(f"the fresh-process run failed ({last})", image)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    timings = json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))["timings_seconds"]
    stages = {"start-up": [wall - timings["total_seconds"], cpu - timings.get("total_cpu_seconds", 0.0)]}
    for key, _ in STAGES:
        if f"{key}_seconds" in timings:
            stages[key] = [timings[f"{key}_seconds"], timings.get(f"{key}_cpu_seconds")]
    return {"command": " ".join(cmd[1:]), "wall_seconds": wall, "cpu_seconds": cpu,
            "stages": {k: [round(v, 2) if v is not None else None for v in pair] for k, pair in stages.items()},
            "encoder_calls": timings.get("encoder_calls"), "distinct_slices": timings.get("distinct_slices"),
            "sam_not_run": timings.get("sam_not_run", [])}


def stage_table(fresh):
    """The fresh-process run's stages as text lines: wall and CPU seconds each."""
    names = {"start-up": "start-up (interpreter, imports)", **dict(STAGES)}
    lines = [f"  {names[k]:<46} {w:7.1f} s wall {c if c is not None else float('nan'):7.1f} s CPU"
             for k, (w, c) in fresh["stages"].items()]
    lines.append(f"  {'whole case':<46} {fresh['wall_seconds']:7.1f} s wall {fresh['cpu_seconds']:7.1f} s CPU")
    return lines


def run_bench(image, make, settings, boxes_path=None, templates=None, labels=None, encoders=("all",),
              n_values=(1, 3), timing_slices=4, rounds=2, repeat=1, log=print, cli_args=()):
    """Measure and return the bench record (a dict); ``make(encoder)`` builds a backend.

    ``boxes_path``: the organs' boxes (prompted as ``ursam segment --boxes`` prompts them: the settings'
    mode, or the file's own where it is "auto"); or ``templates``: a template library, from which the
    whole case (localization, deformable stage, SAM, outputs) is timed first, in a fresh process
    (:func:`fresh_case`, with ``cli_args``, the options of ``ursam segment`` that give these settings) and
    then in this one, with the settings' prompt mode.
    """
    load_start = _loadavg()
    cpu_start = time.process_time()
    reference, volume = read_ct(image)
    size = reference.GetSize()
    progress = Progress(quiet=True)
    truth = read_labels(labels, reference)[1] if labels else None
    n_lo, n_hi = n_values

    # one backend per encoder path actually resolved; the default ("auto") runs the whole runs
    eager = make("eager")
    names = expand_encoders(encoders, available_paths(eager.name) if eager.device.type == "cpu" else ())
    backends, main_name = {"eager": eager}, None
    for name in names:
        if name == "eager":
            continue
        b = make(name)
        resolved = getattr(b, "encoder_name", "eager")
        backends.setdefault(resolved, b)
        if name == "auto":
            main_name = resolved
    if main_name is None:
        main_name = getattr(make("auto"), "encoder_name", "eager")
        backends.setdefault(main_name, make(main_name))
    if "eager" not in names and main_name != "eager":
        del backends["eager"]
    main = backends[main_name]
    eager = backends.get("eager")

    record = {"image": str(image), "boxes": str(boxes_path) if boxes_path else None,
              "templates": str(templates) if templates else None, "backend": main.name,
              "device": str(main.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "cpu_count": os.cpu_count(), "encoder_path": main_name,
              "encoder_paths": list(backends), "exact_paths": [n for n in backends if n in ("eager",) + AUTO_ORDER]}
    with tempfile.TemporaryDirectory(prefix="ursam-bench-") as tmp:
        if templates is not None:
            fresh = fresh_case(image, templates, cli_args, Path(tmp) / "fresh-case")
            record["fresh_case"] = fresh
            log(f"whole case in a fresh process ({fresh['command']}), by stage:")
            for line in stage_table(fresh):
                log(line)
            if fresh["sam_not_run"]:
                log(f"  SAM not run for {', '.join(fresh['sam_not_run'])} (the calibrated fusion gives it no "
                    f"weight): {fresh['encoder_calls']} encoder calls")
            t0, c0 = time.perf_counter(), time.process_time()
            job = ScanJob(image, LibrarySource(templates), settings, out=str(Path(tmp) / "whole-case"))
            outcome = run_scan(job, lambda percentile: main, progress)
            whole = time.perf_counter() - t0
            res = outcome.result
            record["whole_case_seconds"] = round(whole, 2)
            record["whole_case_cpu_seconds"] = round(time.process_time() - c0, 2)
            record["whole_case_timings"] = {k: round(v, 2) if isinstance(v, float) else v
                                            for k, v in res.timings.items()}
            record["registration"] = registration_record(outcome, outcome.settings)
            boxes = res.boxes
            log(f"whole case ({main_name} encoder, prompts {outcome.settings.prompts.mode}): {whole:.1f} s "
                f"({record['whole_case_cpu_seconds']:.1f} CPU s): localization "
                f"{outcome.localization.info.get('seconds')} s, deformable "
                f"{record['registration']['deformable_seconds']} s, SAM and outputs "
                f"{res.timings['segment_seconds'] + res.timings['write_seconds']:.1f} s")
            log("seconds per support: affine " + json.dumps(record["registration"]["affine_seconds_per_support"])
                + f", {outcome.settings.deformable.method} "
                + json.dumps(record["registration"]["deformable_seconds_per_support"]))
        else:
            outcome = run_scan(ScanJob(image, BoxSource(boxes_path), settings, stop_after="localize"), None,
                               progress)
            boxes = outcome.localization.boxes
            record["whole_case_seconds"] = None
            record["registration"] = None
        run_settings = outcome.settings

        zs_all = pipeline.distinct_slices(boxes)
        zs = _spread(zs_all, timing_slices)
        record["organs"] = len(boxes)
        record["distinct_slices"] = None if templates is not None else len(zs_all)
        log(f"case {image}: {len(boxes)} organs, grid {size}")
        log(f"backend {main.name} on {main.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"encoder paths {', '.join(backends)}")

        enc, enc_cpu = encoder_ms(backends, volume, zs, rounds)
        log("encoder ms/slice: " + ", ".join(f"{k} {v}" for k, v in enc.items())
            + "; CPU ms/slice (torch at 1 thread): " + ", ".join(f"{k} {v}" for k, v in enc_cpu.items()))

        p_hi = _with_n(run_settings.params, n_hi)
        dec, n_boxes_slice, z_dec = decoder_ms_per_box(main, volume, boxes, p_hi, rounds)
        log(f"decoder ms/box on slice {z_dec} ({n_boxes_slice} boxes): "
            + ", ".join(f"{k} {v}" for k, v in dec.items()))

        seconds = {n_lo: [], n_hi: []}
        cpu_seconds = {n_lo: [], n_hi: []}
        calls, results = {}, {}
        for r in range(repeat):
            for n in (n_lo, n_hi):
                s, cs, c, res = whole_run(outcome, main, _with_settings_n(run_settings, n), tmp,
                                          f"{main_name}-n{n}-{r}")
                seconds[n].append(s)
                cpu_seconds[n].append(cs)
                calls[n] = c
                results[n] = res
                log(f"whole run n={n} ({main_name} encoder): {s:.1f} s ({cs:.1f} CPU s), {c} encoder calls, "
                    f"{res.timings['distinct_slices']} distinct slices")
        others = {}
        for name, b in backends.items():
            if name == main_name:
                continue
            s, cs, c, res = whole_run(outcome, b, _with_settings_n(run_settings, n_hi), tmp,
                                      f"{name}-n{n_hi}")
            others[name] = (s, cs, res)
            log(f"whole run n={n_hi} ({name} encoder): {s:.1f} s ({cs:.1f} CPU s)")

    s_lo, s_hi = statistics.median(seconds[n_lo]), statistics.median(seconds[n_hi])
    runs = dict(others)
    runs[main_name] = (s_hi, statistics.median(cpu_seconds[n_hi]), results[n_hi])
    eager_run = runs["eager"][2] if "eager" in runs else None
    d_eager = organ_dice(eager_run, truth) if eager_run is not None and truth is not None else None
    paths = {}
    for name in backends:
        entry = {"encoder_ms_per_slice": enc[name], "encoder_cpu_ms_per_slice": enc_cpu[name],
                 "exact": name in record["exact_paths"],
                 "seconds_n3": round(runs[name][0], 2), "cpu_seconds_n3": round(runs[name][1], 2)}
        if "eager" in enc:
            entry["speedup_vs_eager"] = round(enc["eager"] / enc[name], 2)
            entry["speedup_vs_eager_cpu"] = round(enc_cpu["eager"] / enc_cpu[name], 2)
        if eager_run is not None and name != "eager":
            entry["mask_dice_vs_eager_min"] = mask_agreement(runs[name][2], eager_run)
            if d_eager is not None:
                d = organ_dice(runs[name][2], truth)
                entry["dice_delta_vs_eager"] = round(max(abs(d[m][k] - d_eager[m][k])
                                                         for m in DICE_METHODS for k in d[m]), 4)
                entry["dice_mean_delta_vs_eager"] = round(statistics.mean(
                    d[m][k] - d_eager[m][k] for m in DICE_METHODS for k in d[m]), 4)
        paths[name] = entry
    fast_name = main_name if main_name != "eager" else next((k for k in backends if k != "eager"), None)
    res_hi = results[n_hi]
    record.update({
        "distinct_slices": res_hi.timings["distinct_slices"],
        "encoder_calls": calls[n_hi],
        "encoder_calls_n1": calls[n_lo],
        "n_values": [n_lo, n_hi],
        "seconds_n1": round(s_lo, 2),
        "seconds_n3": round(s_hi, 2),
        "ratio_n3_n1": round(s_hi / s_lo, 3),
        # CPU seconds of the process: what a busy shared machine disturbs least
        "cpu_seconds_n1": round(statistics.median(cpu_seconds[n_lo]), 2),
        "cpu_seconds_n3": round(statistics.median(cpu_seconds[n_hi]), 2),
        "ratio_n3_n1_cpu": round(statistics.median(cpu_seconds[n_hi]) / statistics.median(cpu_seconds[n_lo]), 3),
        "seconds_all_runs": {f"n{n}": [round(v, 1) for v in seconds[n]] for n in seconds},
        "run_timings_n3": {k: round(v, 2) if isinstance(v, float) else v for k, v in res_hi.timings.items()},
        "encoder_ms_per_slice": enc,
        "encoder_cpu_ms_per_slice": enc_cpu,
        "paths": paths,
        "speedup_fast_vs_eager": paths.get(fast_name, {}).get("speedup_vs_eager") if fast_name else None,
        "speedup_fast_vs_eager_cpu": paths.get(fast_name, {}).get("speedup_vs_eager_cpu") if fast_name else None,
        "decoder": main.decoder_name,
        "decoder_ms_per_box": dec,
        "decoder_speedup_fast_vs_eager": round(dec["eager"] / dec["fast"], 2) if "fast" in dec else None,
        "seconds_n3_eager_encoder": paths["eager"]["seconds_n3"] if "eager" in paths else None,
        "dice_delta_fast_vs_eager": paths.get(fast_name, {}).get("dice_delta_vs_eager") if fast_name else None,
        "mask_dice_fast_vs_eager_min": paths.get(fast_name, {}).get("mask_dice_vs_eager_min") if fast_name else None,
    })
    if d_eager is not None:
        if fast_name:
            record["dice_ursam_fast"] = organ_dice(runs[fast_name][2], truth)[pipeline.URSAM]
        record["dice_ursam_eager"] = d_eager[pipeline.URSAM]
    elif truth is not None:
        record["dice_ursam"] = organ_dice(res_hi, truth)[pipeline.URSAM]
    record["peak_rss_mb"] = peak_rss_mb()
    record["cpu_seconds_total"] = round(time.process_time() - cpu_start, 1)
    # 1-minute load average at the start and the end: above the core count, timings are shared
    record["load_average"] = [round(load_start[0], 1) if load_start else None,
                              round(_loadavg()[0], 1) if _loadavg() else None]

    rule = "holds" if record["encoder_calls"] == record["distinct_slices"] else "BROKEN"
    log(f"encoder calls {record['encoder_calls']} for {record['distinct_slices']} distinct slices ({rule}); "
        f"n={n_hi} vs n={n_lo}: {record['ratio_n3_n1']}x ({record['ratio_n3_n1_cpu']}x in CPU time)")
    for name, e in paths.items():
        log(f"  {name}: {e['encoder_ms_per_slice']} ms/slice, speed-up {e.get('speedup_vs_eager')} "
            f"({e.get('speedup_vs_eager_cpu')} in CPU time), Dice delta {e.get('dice_delta_vs_eager')}, "
            f"worst mask Dice vs eager {e.get('mask_dice_vs_eager_min')}")
    log(f"peak RSS {record['peak_rss_mb']} MiB")
    return record


def _loadavg():
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return ()


def _with_n(params, n):
    return replace(params, n_aug=n)


def _with_settings_n(settings, n):
    return replace(settings, params=_with_n(settings.params, n))


def dumps(record):
    return json.dumps(record, separators=(", ", ": "))
