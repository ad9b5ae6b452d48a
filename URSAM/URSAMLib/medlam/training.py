"""Training MedLAM on unlabelled CT (METHOD.md §1), resumable and seeded.

``train(images, out, settings)`` prepares every scan once (3 mm, HU mapping),
then runs Adam steps on self-supervised batches (losses.py), writing the
checkpoint atomically every ``save_every`` steps and at the end. Batches come
from the ``torch`` sampler (draw.py: the scans held on the training device,
a batch drawn as tensor operations) or the ``numpy`` reference (sampling.py).
The run reports steps per second and how a step's time splits between
drawing the batch and the network step.
With ``resume``, it continues from the checkpoint at ``out``: same weights,
optimizer, scheduler and random states, so an interrupted run continues as if
it had not stopped.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import URSAMError
from ..progress import Progress
from . import budget
from .bank import VolumeBank
from .checkpoint import network_from_state, pick_device, read_checkpoint, save_checkpoint
from .draw import draw_batch as draw_tensor_batch
from .losses import medlam_loss
from .network import MedLAMNet, NetConfig
from .preprocessing import prepare_path
from .sampling import AugmentConfig, draw_batch, draw_pairs

#: batch samplers: draw.py's tensor operations on the training device, sampling.py's numpy reference
SAMPLERS = ("torch", "numpy")


@dataclass
class TrainSettings:
    steps: int = 1000
    #: scans per step; None: fit to the device (budget.py)
    batch_size: int = None
    #: patches drawn from each scan; every pair of them feeds the offset loss
    patches_per_scan: int = 2
    lr: float = 2e-4
    weight_decay: float = 1e-4
    #: learning-rate decay: times ``lr_gamma`` every ``lr_step`` steps (MedLSAM: 0.8 per 10 epochs)
    lr_step: int = 10000
    lr_gamma: float = 0.8
    seed: int = 0
    save_every: int = 50
    log_every: int = 10
    #: offset loss unit (mm) and matching-loss settings (losses.py)
    offset_unit_mm: float = 10.0
    match_radius_mm: float = 3.0
    temperature: float = 15.0
    #: scans held out to measure the offset error on fixed, unaugmented pairs
    val_images: int = 4
    val_pairs: int = 16
    #: stop (after saving) once this many minutes have passed; None: no limit
    max_minutes: float = None
    #: "torch" or "numpy" (SAMPLERS); stored, since each has its own random stream
    sampler: str = "torch"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self):
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        # Checkpoints from before the torch sampler drew with numpy: a resume must continue that stream.
        d.setdefault("sampler", "numpy")
        aug = AugmentConfig(**d.pop("augment", {}))
        known = set(cls.__dataclass_fields__)
        return cls(augment=aug, **{k: v for k, v in d.items() if k in known})

    #: what a resumed run may change: how long, and how often it reports and saves
    RUN_ONLY = ("steps", "max_minutes", "save_every", "log_every")


def load_volumes(paths, config, progress, cache_dir=None):
    """Each scan on the 3 mm grid as uint8 [z, y, x] (unpadded); cached as .npy if ``cache_dir``."""
    volumes = []
    progress.stage(f"preparing {len(paths)} scans")
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        vol = None
        if cache:
            ident = json.dumps([str(Path(path).absolute()), config.spacing_mm, config.hu_points, config.hu_values])
            key = hashlib.sha1(ident.encode()).hexdigest()[:12]
            # Scans are often all named image.nii.gz: the folder name makes the cache readable.
            f = cache / f"{Path(path).parent.name}_{Path(path).name.split('.')[0]}_{key}.npy"
            if f.exists():
                try:
                    vol = np.load(f)
                except (OSError, ValueError):
                    vol = None
        if vol is None:
            vol = prepare_path(path, spacing_mm=config.spacing_mm, pad=0,
                               hu_points=config.hu_points, hu_values=config.hu_values).volume
            if cache:
                np.save(f, vol)
        volumes.append(np.ascontiguousarray(vol))
        progress.step(i + 1, len(paths))
    return volumes


def _to_tensors(batch, device):
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.to(device=device, dtype=torch.long if k.startswith("points") else torch.float32)
    return out


def _rng_state(np_rng, draw_gen):
    return {"numpy": json.dumps(np_rng.bit_generator.state), "torch": torch.get_rng_state(),
            "draw": draw_gen.get_state(), "draw_device": draw_gen.device.type}


def _restore_rng(np_rng, draw_gen, state):
    """Restores the generators; False where the torch sampler's state is another device type's (unusable)."""
    np_rng.bit_generator.state = json.loads(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "draw" not in state:
        return True
    if state.get("draw_device", "cpu") != draw_gen.device.type:
        return False
    draw_gen.set_state(state["draw"])
    return True


def activation_bytes(config):
    """Bytes of every module output in a forward pass of one patch (shapes only: run on the meta device)."""
    with torch.device("meta"):
        net = MedLAMNet(config)
    total = []

    def hook(module, inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total.append(t.numel() * t.element_size())

    # An in-place module (ReLU) writes into its input: no memory of its own.
    handles = [m.register_forward_hook(hook) for m in net.modules()
               if not list(m.children()) and not getattr(m, "inplace", False)]
    try:
        net(torch.empty((1, 1) + (config.patch_size,) * 3, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return sum(total)


def free_memory_bytes(device):
    """Free memory of ``device``: GPU memory on CUDA, available RAM on the CPU; None if unknown."""
    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return budget.available_ram_bytes()


def fit_batch_size(config, patches_per_scan, device):
    """(batch size, why): budget.py's rule for this network, patch count and device."""
    per_example = budget.example_bytes(activation_bytes(config), patches_per_scan, config.patch_size)
    free = free_memory_bytes(device)
    if free is None:
        return budget.MAX_BATCH, f"{budget.MAX_BATCH} (free memory unknown)"
    size = budget.fit_batch_size(per_example, free)
    return size, (f"{size}: about {per_example / 2**30:.2f} GiB per scan, {free / 2**30:.1f} GiB free on "
                  f"{device}")


def _sync(device):
    """Waits for the device's queued work, so that the time split is the work's, not the queue's."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


@torch.no_grad()
def validation_error_mm(net, pairs, device, spacing_mm):
    """Mean Euclidean error (mm) of the predicted offset on fixed unaugmented pairs."""
    was = net.training
    net.eval()
    t = _to_tensors(pairs, device)
    p0 = net(t["ori0"], features=False)["position"]
    p1 = net(t["ori1"], features=False)["position"]
    err = (net.offset_mm(p0, p1) - (t["centre0"] - t["centre1"]) * spacing_mm).norm(dim=1)
    net.train(was)
    return float(err.mean())


def train(images, out, settings=None, config=None, device="auto", resume=False, progress=None,
          cache_dir=None, draw_workers=None, stats=None):
    """Train (or resume) and return the final checkpoint path. ``images``: list of CT paths.

    ``draw_workers``: CPU threads the torch sampler renders a batch with
    (default: torch's thread count, all cores); it does not change the
    batches. ``stats``: an optional dict, filled with the run's speed
    (``steps_per_second``, ``draw_seconds`` and ``step_seconds`` per step,
    ``batch_size``, ``sampler``).
    """
    settings = settings or TrainSettings()
    progress = progress or Progress()
    device = pick_device(device)
    out = Path(out)
    if out.is_dir():
        raise URSAMError("--out must be a checkpoint file, not a folder", out)
    images = [str(p) for p in images]
    if len(images) < 2:
        raise URSAMError(f"training needs at least 2 CT scans, got {len(images)}")

    state = None
    if resume and out.exists():
        state = read_checkpoint(out)
        if "optimizer" not in state or "rng" not in state:
            raise URSAMError("checkpoint holds weights only (no training state); cannot resume", out)
        saved = NetConfig.from_dict(dict(state["config"]))
        if config is not None and config.to_dict() != saved.to_dict():
            raise URSAMError("checkpoint was trained with other network settings than asked for "
                             f"({saved.widths} vs {config.widths}); drop the network options to resume", out)
        config = saved
        # The stored settings win (an exact continuation), except how long and how often to save.
        stored = TrainSettings.from_dict(state.get("train", {}))
        for key in TrainSettings.RUN_ONLY:
            setattr(stored, key, getattr(settings, key))
        settings = stored
    elif out.exists() and not resume:
        raise URSAMError("checkpoint exists (use --resume to continue it, or choose another --out)", out)
    config = config or NetConfig()
    if settings.sampler not in SAMPLERS:
        raise URSAMError(f"sampler must be one of {', '.join(SAMPLERS)}, got {settings.sampler!r}")
    if settings.batch_size is None:
        settings.batch_size, why = fit_batch_size(config, settings.patches_per_scan, device)
        progress.info(f"batch size {why}")

    torch.manual_seed(settings.seed)
    np_rng = np.random.default_rng(settings.seed)
    draw_gen = torch.Generator(device=device).manual_seed(settings.seed)
    net = MedLAMNet(config) if state is None else network_from_state(state, out)
    net.to(device).train()
    if device == "cpu":
        # mkldnn's 3D convolutions run about twice as fast in channels-last layout.
        net.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=settings.lr_step, gamma=settings.lr_gamma)
    step = 0
    history = []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        history = list(state.get("history", []))
        if not _restore_rng(np_rng, draw_gen, state["rng"]) and settings.sampler == "torch":
            # Each device type has its own generator: the batches go on, but not as the first run's would.
            progress.warn(f"the checkpoint's batches were drawn on {state['rng']['draw_device']}, not {device}; "
                          "the resumed run draws other batches than an uninterrupted one")
        progress.info(f"resuming {out} at step {step}")
    if step >= settings.steps:
        progress.info(f"checkpoint is already at step {step} of {settings.steps}; nothing to do")
        return out

    ordered = sorted(images)
    n_val = min(settings.val_images, max(len(ordered) - 2, 0))
    train_paths = ordered[:len(ordered) - n_val] if n_val else ordered
    val_paths = ordered[len(ordered) - n_val:] if n_val else []
    if state is not None and state.get("images") and sorted(state["images"]) != sorted(train_paths):
        progress.warn("the scans differ from those the checkpoint was trained on; the run continues on "
                      "the new list")
    volumes = load_volumes(train_paths, config, progress, cache_dir)
    bank = VolumeBank(volumes, device) if settings.sampler == "torch" else None
    if draw_workers is None:
        draw_workers = torch.get_num_threads()
    val_pairs = None
    if val_paths:
        val_vols = load_volumes(val_paths, config, progress, cache_dir)
        # Fixed pairs: their own generator, so they are the same at every save and after a resume.
        val_pairs = draw_pairs(val_vols, settings.val_pairs, config.patch_size,
                               np.random.default_rng(settings.seed + 1), settings.augment.body)
        baseline = float(np.linalg.norm((val_pairs["centre0"] - val_pairs["centre1"]) * config.spacing_mm,
                                        axis=1).mean())
        progress.info(f"validation: {len(val_pairs['centre0'])} fixed pairs of {len(val_paths)} held-out scans; "
                      f"predicting no offset would miss by {baseline:.1f} mm on average")

    def save():
        entry = {"step": step}
        if val_pairs is not None:
            entry["val_offset_error_mm"] = round(validation_error_mm(net, val_pairs, device, config.spacing_mm), 2)
        history.append(entry)
        save_checkpoint(out, net, step=step, seed=settings.seed, optimizer=opt, scheduler=sched,
                        rng=_rng_state(np_rng, draw_gen), train=settings.to_dict(), history=history, images=train_paths)
        return entry

    # No bar: one line every log_every steps reads better next to the loss figures.
    progress.info(f"training {len(train_paths)} scans ({len(val_paths)} held out) on {device}: steps {step}->"
                  f"{settings.steps}, {settings.batch_size} x {settings.patches_per_scan} patches per step, "
                  f"widths {config.widths}, seed {settings.seed}, {settings.sampler} sampler")
    progress.stage("training")
    started = time.monotonic()
    first_step = step
    running = []
    # Seconds spent drawing batches and in network steps: the whole run, and since the last log line.
    spent = {"draw": 0.0, "step": 0.0}
    window = {"draw": 0.0, "step": 0.0, "steps": 0}
    while step < settings.steps:
        t0 = time.perf_counter()
        if bank is not None:
            batch = draw_tensor_batch(bank, settings.batch_size, config.patch_size, settings.augment, draw_gen,
                                      settings.patches_per_scan, workers=draw_workers)
        else:
            batch = _to_tensors(draw_batch(volumes, settings.batch_size, config.patch_size, settings.augment,
                                           np_rng, settings.patches_per_scan), device)
        _sync(device)
        t1 = time.perf_counter()
        loss, parts = medlam_loss(net, batch, config.spacing_mm, settings.offset_unit_mm,
                                  settings.match_radius_mm, settings.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        running.append((loss.item(), parts["offset"], parts["match"], parts["offset_mm_error"]))
        t2 = time.perf_counter()  # loss.item() has waited for the device
        for d in (spent, window):
            d["draw"] += t1 - t0
            d["step"] += t2 - t1
        window["steps"] += 1
        progress.step(step, settings.steps)
        if step % settings.log_every == 0 or step == settings.steps:
            m = np.mean(running, axis=0)
            running = []
            n = max(window["steps"], 1)
            draw_s, step_s = window["draw"] / n, window["step"] / n
            history.append({"step": step, "loss": round(float(m[0]), 4), "offset": round(float(m[1]), 4),
                            "match": round(float(m[2]), 4), "train_offset_error_mm": round(float(m[3]), 2),
                            "steps_per_second": round(1.0 / max(draw_s + step_s, 1e-9), 4),
                            "draw_seconds": round(draw_s, 4), "step_seconds": round(step_s, 4)})
            window = {"draw": 0.0, "step": 0.0, "steps": 0}
            progress.info(f"step {step}/{settings.steps}: loss {m[0]:.3f} (offset {m[1]:.3f}, match {m[2]:.3f}), "
                          f"offset error {m[3]:.1f} mm, {1.0 / max(draw_s + step_s, 1e-9):.2f} steps/s "
                          f"(draw {draw_s:.2f} s + network {step_s:.2f} s per step)")
        timed_out = settings.max_minutes is not None and time.monotonic() - started > 60 * settings.max_minutes
        if step % settings.save_every == 0 or step == settings.steps or timed_out:
            entry = save()
            if "val_offset_error_mm" in entry:
                progress.info(f"saved step {step}: validation offset error {entry['val_offset_error_mm']:.1f} mm")
        if timed_out:
            progress.info(f"stopped after {settings.max_minutes} min at step {step}; --resume continues")
            break
    progress.done()
    done = max(step - first_step, 1)
    speed = {"steps": step - first_step, "steps_per_second": round(done / max(spent["draw"] + spent["step"], 1e-9), 4),
             "draw_seconds": round(spent["draw"] / done, 4), "step_seconds": round(spent["step"] / done, 4),
             "batch_size": settings.batch_size, "patches_per_scan": settings.patches_per_scan,
             "sampler": settings.sampler, "device": str(device)}
    if stats is not None:
        stats.update(speed)
    return out
