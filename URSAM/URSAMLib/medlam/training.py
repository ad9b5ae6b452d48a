"""Training MedLAM on unlabelled CT (METHOD.md §1), resumable and seeded.

``train(images, out, settings)`` prepares every scan once (3 mm, HU mapping),
then runs Adam steps on self-supervised batches (sampling.py, losses.py),
writing the checkpoint atomically every ``save_every`` steps and at the end.
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
from .checkpoint import network_from_state, pick_device, read_checkpoint, save_checkpoint
from .losses import medlam_loss
from .network import MedLAMNet, NetConfig
from .preprocessing import prepare_path
from .sampling import AugmentConfig, draw_batch, draw_pairs


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 2
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
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self):
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
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


def _rng_state(np_rng):
    return {"numpy": json.dumps(np_rng.bit_generator.state), "torch": torch.get_rng_state()}


def _restore_rng(np_rng, state):
    np_rng.bit_generator.state = json.loads(state["numpy"])
    torch.set_rng_state(state["torch"])


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
          cache_dir=None):
    """Train (or resume) and return the final checkpoint path. ``images``: list of CT paths."""
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

    torch.manual_seed(settings.seed)
    np_rng = np.random.default_rng(settings.seed)
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
        _restore_rng(np_rng, state["rng"])
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
                        rng=_rng_state(np_rng), train=settings.to_dict(), history=history, images=train_paths)
        return entry

    # No bar: one line every log_every steps reads better next to the loss figures.
    progress.info(f"training {len(train_paths)} scans ({len(val_paths)} held out) on {device}: steps {step}->"
                  f"{settings.steps}, {settings.batch_size} x {settings.patches_per_scan} patches per step, "
                  f"widths {config.widths}, seed {settings.seed}")
    progress.stage("training")
    started = time.monotonic()
    running = []
    while step < settings.steps:
        batch = _to_tensors(draw_batch(volumes, settings.batch_size, config.patch_size, settings.augment, np_rng,
                                       settings.patches_per_scan), device)
        loss, parts = medlam_loss(net, batch, config.spacing_mm, settings.offset_unit_mm,
                                  settings.match_radius_mm, settings.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        running.append((loss.item(), parts["offset"], parts["match"], parts["offset_mm_error"]))
        progress.step(step, settings.steps)
        if step % settings.log_every == 0 or step == settings.steps:
            m = np.mean(running, axis=0)
            running = []
            rate = (time.monotonic() - started) / max(step - (int(state["step"]) if state else 0), 1)
            history.append({"step": step, "loss": round(float(m[0]), 4), "offset": round(float(m[1]), 4),
                            "match": round(float(m[2]), 4), "train_offset_error_mm": round(float(m[3]), 2)})
            progress.info(f"step {step}/{settings.steps}: loss {m[0]:.3f} (offset {m[1]:.3f}, match {m[2]:.3f}), "
                          f"offset error {m[3]:.1f} mm, {rate:.2f} s/step")
        timed_out = settings.max_minutes is not None and time.monotonic() - started > 60 * settings.max_minutes
        if step % settings.save_every == 0 or step == settings.steps or timed_out:
            entry = save()
            if "val_offset_error_mm" in entry:
                progress.info(f"saved step {step}: validation offset error {entry['val_offset_error_mm']:.1f} mm")
        if timed_out:
            progress.info(f"stopped after {settings.max_minutes} min at step {step}; --resume continues")
            break
    progress.done()
    return out
