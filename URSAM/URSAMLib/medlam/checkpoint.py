"""MedLAM checkpoints: one file with the network settings, weights and training state.

A checkpoint holds everything to rebuild the network (``config``) and, when
written by training, to resume it exactly (``step``, ``seed``, optimizer and
scheduler state, random generator states). Writes are atomic: a crash leaves
the previous checkpoint in place.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import URSAMError
from .network import MedLAMNet, NetConfig

FORMAT = "ursam-medlam"
VERSION = 1


def save_checkpoint(path, net, step=0, seed=None, optimizer=None, scheduler=None, rng=None,
                    train=None, history=None, images=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": net.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "step": int(step),
        "seed": seed,
        "train": train or {},
        "history": history or [],
        "images": [str(p) for p in (images or [])],
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if rng is not None:
        state["rng"] = rng
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
    return path


def read_checkpoint(path):
    """The checkpoint's dict, checked to be a MedLAM checkpoint; URSAMError otherwise."""
    path = Path(path)
    if not path.exists():
        raise URSAMError("localizer checkpoint not found", path)
    if path.is_dir():
        raise URSAMError("localizer checkpoint is a folder, not a file", path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise URSAMError(f"cannot read localizer checkpoint: not a MedLAM checkpoint or a corrupt file "
                         f"({detail})", path) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise URSAMError("not a MedLAM localizer checkpoint (written by `ursam train-localizer`)", path)
    if int(state.get("version", 0)) > VERSION:
        raise URSAMError(f"localizer checkpoint has format version {state.get('version')}; this URSAM "
                         f"reads up to {VERSION}", path)
    for key in ("config", "model"):
        if key not in state:
            raise URSAMError(f"localizer checkpoint lacks its '{key}' entry (corrupt file)", path)
    return state


def network_from_state(state, path=None):
    """Build the network of a checkpoint and load its weights; URSAMError on a mismatch."""
    try:
        config = NetConfig.from_dict(dict(state["config"]))
    except (TypeError, ValueError) as err:
        raise URSAMError(f"localizer checkpoint has invalid network settings ({err})", path) from None
    net = MedLAMNet(config)
    expected = net.state_dict()
    weights = state["model"]
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != tuple(weights[k].shape))
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(weights[k].shape)} vs "
                         f"{tuple(expected[k].shape)})")
        raise URSAMError("localizer checkpoint weights do not match its network settings: "
                         + ", ".join(parts), path)
    net.load_state_dict(weights)
    return net


def pick_device(name):
    """auto (CUDA when there is one), cpu, or cuda[:N]; URSAMError for anything else."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = str(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise URSAMError(f"device {name}: no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise URSAMError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return name


def load_network(path, device="cpu"):
    """(network in eval mode on ``device``, checkpoint dict) from a checkpoint file."""
    state = read_checkpoint(path)
    net = network_from_state(state, path).to(device)
    net.eval()
    return net, state
