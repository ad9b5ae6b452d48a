"""``ursam bench``: what a segment run costs on this machine, every figure measured side by side.

One call measures, in one process and in interleaved rounds so that a busy
machine hits every path alike:

- the encoder per slice on each encoder path (eager and the fast ones);
- the decoder per box, fast and eager, on the slice with the most boxes;
- two whole segment runs (SAM, rectification and every output file) with 1
  and with n augmented boxes, on the default path, and the encoder calls
  they made (one per distinct slice, whatever the organs and boxes);
- one more whole run on the eager encoder, whose masks give the largest
  per-organ Dice difference between the fast and the eager path;
- the process's peak resident memory.

It prints a short summary, then one JSON object as its last line.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import pipeline
from ..boxes import load_boxes
from ..imageio import read_ct, read_labels
from ..progress import Progress
from ..sam.backends import one_torch_thread
from ..segment import segment_query, write_results
from .metrics import dice

#: masks whose Dice is compared between encoder paths
DICE_METHODS = ("auto", "ensemble", "ursam")


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
    from ..prompt_augmentation import augment_box, organ_rngs

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


def whole_run(volume, reference, boxes, backend, params, out_root, tag):
    """One ``ursam segment --boxes`` run without reading the inputs: SAM, rectification, all outputs."""
    from ..prompt_modes import PromptOptions, default_mode
    from ..settings import Settings

    settings = Settings(params=params, prompts=PromptOptions(mode=default_mode(boxes=boxes)))
    calls0 = backend.encoder_calls
    c0, t0 = time.process_time(), time.perf_counter()
    result = segment_query(volume, reference, boxes, backend, settings, progress=Progress(quiet=True))
    write_results(result, Path(out_root) / tag, overwrite=False, progress=Progress(quiet=True))
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


def run_bench(image, boxes_path, make, params, labels=None, encoders=("eager", "auto"), n_values=(1, 3),
              timing_slices=4, rounds=2, repeat=1, log=print):
    """Measure and return the bench record (a dict); ``make(encoder)`` builds a backend."""
    load_start = _loadavg()
    reference, volume = read_ct(image)
    size = reference.GetSize()
    progress = Progress(quiet=True)
    boxes = load_boxes(boxes_path, size, warn=progress.warn)
    truth = read_labels(labels, reference)[1] if labels else None
    n_lo, n_hi = n_values

    # one backend per encoder path actually resolved; the default ("auto") runs the whole runs
    backends, main_name = {}, None
    for name in list(encoders) + ([] if "auto" in encoders else ["auto"]):
        b = make(name)
        resolved = getattr(b, "encoder_name", "eager")
        backends.setdefault(resolved, b)
        if name == "auto":
            main_name = resolved
    main = backends[main_name]
    eager = backends.get("eager")
    fast_name = main_name if main_name != "eager" else next((k for k in backends if k != "eager"), None)

    zs_all = pipeline.distinct_slices({"main": boxes})
    zs = _spread(zs_all, timing_slices)
    log(f"case {image}: {len(boxes)} organs, {len(zs_all)} distinct slices, grid {size}")
    log(f"backend {main.name} on {main.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"encoder paths {', '.join(backends)}")

    enc, enc_cpu = encoder_ms(backends, volume, zs, rounds)
    log("encoder ms/slice: " + ", ".join(f"{k} {v}" for k, v in enc.items())
        + "; CPU ms/slice (torch at 1 thread): " + ", ".join(f"{k} {v}" for k, v in enc_cpu.items()))

    p_hi = _with_n(params, n_hi)
    dec, n_boxes_slice, z_dec = decoder_ms_per_box(main, volume, boxes, p_hi, rounds)
    log(f"decoder ms/box on slice {z_dec} ({n_boxes_slice} boxes): " + ", ".join(f"{k} {v}" for k, v in dec.items()))

    seconds = {n_lo: [], n_hi: []}
    cpu_seconds = {n_lo: [], n_hi: []}
    calls = {}
    results = {}
    with tempfile.TemporaryDirectory(prefix="ursam-bench-") as tmp:
        for r in range(repeat):
            for n in (n_lo, n_hi):
                s, cs, c, res = whole_run(volume, reference, boxes, main, _with_n(params, n), tmp,
                                          f"{main_name}-n{n}-{r}")
                seconds[n].append(s)
                cpu_seconds[n].append(cs)
                calls[n] = c
                results[n] = res
                log(f"whole run n={n} ({main_name} encoder): {s:.1f} s ({cs:.1f} CPU s), {c} encoder calls")
        eager_run = None
        if eager is not None and main is not eager:
            s, _, c, eager_run = whole_run(volume, reference, boxes, eager, p_hi, tmp, f"eager-n{n_hi}")
            log(f"whole run n={n_hi} (eager encoder): {s:.1f} s")
            eager_seconds = s
        else:
            eager_seconds = None

    s_lo, s_hi = statistics.median(seconds[n_lo]), statistics.median(seconds[n_hi])
    record = {
        "image": str(image), "boxes": str(boxes_path), "backend": main.name, "device": str(main.device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "organs": len(boxes),
        "distinct_slices": len(zs_all),
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
        # 1-minute load average at the start and the end: above the core count, timings are shared
        "load_average": [round(load_start[0], 1) if load_start else None,
                         round(_loadavg()[0], 1) if _loadavg() else None],
        "cpu_count": os.cpu_count(),
        "run_timings_n3": {k: round(v, 2) if isinstance(v, float) else v
                           for k, v in results[n_hi].timings.items()},
        "encoder_path": main_name,
        "encoder_ms_per_slice": enc,
        "speedup_fast_vs_eager": (round(enc["eager"] / enc[fast_name], 2)
                                  if fast_name and "eager" in enc else None),
        "encoder_cpu_ms_per_slice": enc_cpu,
        "speedup_fast_vs_eager_cpu": (round(enc_cpu["eager"] / enc_cpu[fast_name], 2)
                                      if fast_name and "eager" in enc_cpu else None),
        "decoder": main.decoder_name,
        "decoder_ms_per_box": dec,
        "decoder_speedup_fast_vs_eager": round(dec["eager"] / dec["fast"], 2) if "fast" in dec else None,
        "seconds_n3_eager_encoder": round(eager_seconds, 2) if eager_seconds is not None else None,
        "dice_delta_fast_vs_eager": None,
        "mask_dice_fast_vs_eager_min": None,
    }
    if eager_run is not None:
        record["mask_dice_fast_vs_eager_min"] = mask_agreement(results[n_hi], eager_run)
        if truth is not None:
            d_fast, d_eager = organ_dice(results[n_hi], truth), organ_dice(eager_run, truth)
            record["dice_delta_fast_vs_eager"] = round(max(
                abs(d_fast[m][k] - d_eager[m][k]) for m in DICE_METHODS for k in d_fast[m]), 4)
            record["dice_ursam_fast"] = d_fast["ursam"]
            record["dice_ursam_eager"] = d_eager["ursam"]
    elif truth is not None:
        record["dice_ursam"] = organ_dice(results[n_hi], truth)["ursam"]
    record["peak_rss_mb"] = peak_rss_mb()

    rule = "holds" if record["encoder_calls"] == record["distinct_slices"] else "BROKEN"
    log(f"encoder calls {record['encoder_calls']} for {record['distinct_slices']} distinct slices ({rule}); "
        f"n={n_hi} vs n={n_lo}: {record['ratio_n3_n1']}x ({record['ratio_n3_n1_cpu']}x in CPU time); fast encoder speedup "
        f"{record['speedup_fast_vs_eager']}; Dice delta {record['dice_delta_fast_vs_eager']}; "
        f"peak RSS {record['peak_rss_mb']} MiB")
    return record


def _loadavg():
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return ()


def _with_n(params, n):
    from dataclasses import replace

    return replace(params, n_aug=n)


def dumps(record):
    return json.dumps(record, separators=(", ", ": "))
