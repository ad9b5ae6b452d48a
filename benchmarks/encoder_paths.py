"""Every CPU path tried for the LiteMedSAM image encoder, measured side by side.

    python benchmarks/encoder_paths.py [--case DIR] [--slices 3] [--threads 1,2] [--compile] [--bf16]
                                       [--time-limit 900]

For each path: milliseconds per slice (CPU time with one thread, which a busy
shared machine disturbs least, and wall time with each --threads value), the
largest feature difference from eager, and the per-organ Dice against the
labels of the case on the sampled slices (boxes from the labels, n = 3
augmented boxes, the fast decoder), whose largest difference from eager is
the path's dice_delta. Paths are measured in interleaved rounds. The last
line is one JSON object.

Paths: eager (PyTorch fp32, the reference), jit-freeze (TorchScript, frozen
and optimized for inference), channels-last, torch-int8 (torch dynamic int8
quantization of the Linear layers), openvino and openvino-bf16 (URSAMLib.sam.fast_encoder:
OpenVINO with float32 and, where the CPU has bf16 instructions, bfloat16 inference), onnx and
onnx-int8 (ONNX Runtime fp32, and with int8 dynamically quantized matrix products),
compile (torch.compile, inductor with freezing; --compile, as its first
compilation takes minutes) and bf16 (CPU autocast; --bf16, as a CPU without
bf16 instructions runs it two orders of magnitude slower).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "URSAM"))

from URSAMLib import pipeline  # noqa: E402
from URSAMLib.boxes import boxes_from_labels  # noqa: E402
from URSAMLib.metrics import dice  # noqa: E402
from URSAMLib.sam.backends import make_backend  # noqa: E402
from URSAMLib.sam.fast_encoder import make_encoder  # noqa: E402

DEFAULT_CASE = ROOT.parent / "shared" / "data" / "abdomen-ts" / "cases" / "tsA_slab"


def build_paths(encoder, args):
    x = torch.zeros(1, 3, 256, 256)
    paths = {"eager": encoder}
    with torch.inference_mode():
        paths["jit-freeze"] = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(encoder, x).eval()))
    cl = make_backend("litemedsam", device="cpu", encoder="eager").model.image_encoder.to(
        memory_format=torch.channels_last)
    paths["channels-last"] = lambda t: cl(t.contiguous(memory_format=torch.channels_last))
    paths["torch-int8"] = torch.ao.quantization.quantize_dynamic(
        make_backend("litemedsam", device="cpu", encoder="eager").model.image_encoder, {torch.nn.Linear},
        dtype=torch.qint8)
    for name in ("openvino", "openvino-bf16", "onnx", "onnx-int8"):
        try:
            paths[name] = make_encoder(encoder, name, "cpu")[0]
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"{name}: not available ({err})")
    if args.compile:
        import torch._inductor.config as cfg  # noqa: PLC0415 (torch loads only where a model runs)

        cfg.freezing = True
        compiled = torch.compile(encoder, dynamic=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        print(f"compile: first call (compilation) {time.perf_counter() - t0:.0f} s")
        paths["compile"] = compiled
    if args.bf16:
        def bf16(t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return encoder(t).float()

        paths["bf16"] = bf16
    return paths


def encoder_input(backend, slice2d):
    """The encoder's input for one slice, exactly as LiteMedSAM._embed builds it."""
    h, w = slice2d.shape
    x = torch.from_numpy(backend.intensity(slice2d))[None, None]
    scale = 256 / max(h, w)
    nh, nw = int(round(h * scale)), int(round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    x = (x - x.min()) / torch.clamp(x.max() - x.min(), min=1e-8)
    return F.pad(x, (0, 256 - nw, 0, 256 - nh)).repeat(1, 3, 1, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", type=Path, default=DEFAULT_CASE, help="case folder with image.nii.gz, labels.nii.gz")
    p.add_argument("--slices", type=int, default=3, help="slices sampled (with the most organs)")
    p.add_argument("--threads", default="1,2", help="thread counts for the wall-time rounds")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also torch.compile (first compilation: minutes)")
    p.add_argument("--bf16", action="store_true", help="also bf16 autocast (very slow without CPU bf16)")
    p.add_argument("--time-limit", type=float, default=900, help="seconds; paths not reached are skipped")
    args = p.parse_args()
    deadline = time.monotonic() + args.time_limit
    threads = [int(t) for t in args.threads.split(",")]

    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(args.case / "image.nii.gz"))).astype(np.float32)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(args.case / "labels.nii.gz")))
    counts = [len(np.unique(truth[z])) for z in range(len(truth))]
    zs = sorted(np.argsort(counts)[::-1][:args.slices].tolist())
    backend = make_backend("litemedsam", device="cpu", encoder="eager")
    encoder = backend.model.image_encoder
    paths = build_paths(encoder, args)
    inputs = [encoder_input(backend, volume[z]) for z in zs]
    record = {"case": str(args.case), "slices": zs, "torch": torch.__version__, "paths": {}}

    with torch.inference_mode():
        ref = [encoder(x) for x in inputs]
        feats = {name: [run(x) for x in inputs] for name, run in paths.items()}  # also the warm-up
    cpu = {name: [] for name in paths}
    wall = {(name, t): [] for name in paths for t in threads}
    skipped = set()
    for _ in range(args.rounds):
        for name, run in paths.items():
            if time.monotonic() > deadline:
                skipped.add(name)
                continue
            with torch.inference_mode():
                torch.set_num_threads(1)
                for x in inputs:
                    t0 = time.process_time()
                    run(x)
                    cpu[name].append(time.process_time() - t0)
                for t in threads:
                    torch.set_num_threads(t)
                    for x in inputs:
                        t0 = time.perf_counter()
                        run(x)
                        wall[(name, t)].append(time.perf_counter() - t0)

    # Dice on the sampled slices: boxes from the labels, n = 3, the fast decoder, each path's features.
    boxes = boxes_from_labels(truth[zs], {int(k): f"label_{k}" for k in np.unique(truth) if k})
    sub = np.ascontiguousarray(volume[zs])
    dices = {}
    for name in paths:
        embs = {i: {"features": f} for i, f in enumerate(feats[name])}
        dices[name] = _organ_dice(backend, sub, truth[zs], boxes, embs)

    for name in paths:
        entry = {"max_feature_diff": round(max((f - r).abs().max().item() for f, r in zip(feats[name], ref)), 6),
                 "dice_delta_vs_eager": round(max(abs(dices[name][k] - dices["eager"][k]) for k in dices[name]), 4)}
        if cpu[name]:
            entry["cpu_ms_1thread"] = round(statistics.median(cpu[name]) * 1e3)
            for t in threads:
                entry[f"wall_ms_{t}threads"] = round(statistics.median(wall[(name, t)]) * 1e3)
        else:
            entry["skipped"] = "time limit"
        record["paths"][name] = entry
    base = record["paths"]["eager"].get("cpu_ms_1thread")
    print(f"{'path':14s} {'cpu ms (1 thr)':>15s} " + " ".join(f"{'wall ms (' + str(t) + ')':>14s}" for t in threads)
          + f" {'speedup':>8s} {'max diff':>10s} {'dice delta':>10s}")
    for name, e in record["paths"].items():
        c = e.get("cpu_ms_1thread")
        e["speedup_cpu_vs_eager"] = round(base / c, 2) if c and base else None
        print(f"{name:14s} {c if c else '-':>15} " + " ".join(f"{e.get(f'wall_ms_{t}threads', '-'):>14}" for t in threads)
              + f" {e['speedup_cpu_vs_eager'] or '-':>8} {e['max_feature_diff']:>10} {e['dice_delta_vs_eager']:>10}")
    print(json.dumps(record))


def _organ_dice(backend, volume, truth, boxes, embs):
    """Per-organ Dice (UR-SAM masks) over the sampled slices, with precomputed embeddings."""
    class Fixed:
        def __init__(self):
            self.encoder_calls = 0

        def __getattr__(self, name):
            return getattr(backend, name)

        def embed(self, slice2d):
            i = (slice2d.__array_interface__["data"][0] - volume.__array_interface__["data"][0]) // slice2d.nbytes
            h, w = slice2d.shape
            scale = 256 / max(h, w)
            e = dict(embs[i])
            e.update(shape=(h, w), new_size=(int(round(h * scale)), int(round(w * scale))), scale=scale)
            return e

    maps, _ = pipeline.run(volume, Fixed(), boxes, pipeline.Params(n_aug=3))
    lm = pipeline.label_map(maps, "ursam", volume.shape)
    return {b.name: float(dice(lm == b.label, truth == b.label)) for b in boxes}


if __name__ == "__main__":
    main()
