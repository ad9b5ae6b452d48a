"""Writing a run's results: label maps, the .seg.nrrd, report.json, overview.png.

All files go to a temporary folder beside the output folder, which is renamed
into place at the end, so an interrupted run leaves the old outputs or the new
ones, never a mix.
"""
from __future__ import annotations

import json
import os
import shutil
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import slicerio

from . import terminology
from .atomic import atomic_path, atomic_write_text, staged_dir
from .boxes import save_boxes
from .errors import URSAMError
from .imageio import write_image
from .review import flagged_components

#: what every run writes into its output folder
OUTPUT_FILES = ("ensemble.nii.gz", "uncertainty.nii.gz", "uncertain.nii.gz", "rectified.nii.gz",
                "rectified.seg.nrrd", "report.json", "overview.png")


def check_output_dir(out_dir, overwrite=False):
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise URSAMError("output path exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise URSAMError("output folder is not empty (use --overwrite to replace its contents)", out)
    return out


@contextmanager
def staged_output_dir(out_dir, overwrite=False):
    """Yield a temporary folder; on success it replaces ``out_dir`` as a whole."""
    out = check_output_dir(out_dir, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(out)
    with staged_dir(out, prefix=f".{out.name}.partial-{os.getpid()}-", replace=True) as stage:
        yield stage


def _remove_stale_stages(out):
    """Remove temporary folders left by runs that were killed (SIGKILL cannot clean up)."""
    for stage in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(stage.name.rsplit(".partial-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(stage, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ijk_to_lps(reference):
    spacing = np.array(reference.GetSpacing())
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = direction * spacing
    m[:3, 3] = reference.GetOrigin()
    return m


def segment_entries(organs):
    """Segment dicts (name, colour, terminology) for ``(label, name)`` pairs."""
    out = []
    for label, name in organs:
        display, color, term = terminology.lookup(name, label)
        seg = {"id": f"Segment_{label}", "name": name, "labelValue": int(label), "layer": 0,
               "color": [round(c, 6) for c in color], "status": "inprogress"}
        if term:
            seg["terminology"] = term
        out.append(seg)
    return out


def write_seg_nrrd(labels_zyx, reference, organs, path):
    """A Slicer segmentation, one named, coloured segment per organ, from a label map."""

    voxels = np.ascontiguousarray(np.transpose(labels_zyx, (2, 1, 0)))
    dtype = np.uint8 if labels_zyx.max(initial=0) < 256 else np.uint16
    seg = {"voxels": voxels.astype(dtype), "ijkToLPS": ijk_to_lps(reference),
           "segments": segment_entries(organs), "containedRepresentationNames": ["Binary labelmap"],
           "masterRepresentation": "Binary labelmap"}
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), seg)


def to_check_line(quality, n_slices=3):
    """The organs the quality estimate says to check, worst first, each with its predicted Dice and its
    first slices to check ("" where none)."""
    marked = sorted((q for q in quality.values() if q.review == "check"), key=lambda q: (q.predicted_dice, q.name))
    return "; ".join(f"{q.name} (predicted Dice {q.predicted_dice:.2f}, slices "
                     f"{', '.join(str(z) for z, _ in q.slices[:n_slices])})" for q in marked)


def write_overview(volume, labels, uncertainty, organs, path, n_slices=4, to_check=""):
    """A few axial slices: CT, rectified contours, uncertainty as a heat overlay; ``to_check``: the organs
    to check (:func:`to_check_line`), written under the title."""
    import matplotlib  # noqa: PLC0415 (matplotlib loads only where a figure is drawn)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib loads only where a figure is drawn)

    zs = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1))
    if zs.size == 0:
        zs = np.arange(volume.shape[0])
    picks = np.unique(zs[np.linspace(0, zs.size - 1, min(n_slices, zs.size)).round().astype(int)])
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4.8), squeeze=False)
    colors = {label: terminology.lookup(name, label)[1] for label, name in organs}
    umax = max(float(uncertainty.max()), 1e-6)
    for ax, z in zip(axes[0], picks):
        ax.imshow(np.clip(volume[z], -160, 240), cmap="gray", origin="upper")
        heat = np.ma.masked_less_equal(uncertainty[z], 0.05 * umax)
        ax.imshow(heat, cmap="hot", alpha=0.55, vmin=0, vmax=np.log(2), origin="upper")
        for label, color in colors.items():
            m = labels[z] == label
            if m.any():
                ax.contour(m, levels=[0.5], colors=[color], linewidths=1.2)
        ax.set_title(f"slice z={z}")
        ax.axis("off")
    fig.suptitle("UR-SAM: rectified contours, uncertainty heat overlay\n"
                 + (textwrap.fill(f"Check: {to_check}", 40 * len(picks)) if to_check else "No organ to check"),
                 color="black" if not to_check else "firebrick", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)


def write_json(data, path):
    atomic_write_text(path, json.dumps(data, indent=1, default=_json_default))


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def organ_voxels(labels, organs):
    """``{label: voxels}`` of each organ (``[(label, name)]``) in a label map."""
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=max([0] + [v for v, _ in organs]) + 1)
    return {v: int(counts[v]) for v, _ in organs}


def write_results(result, out_dir, overwrite=False, boxes_info=None, extra_report=None, started=None,
                  extra_files=None, cpu_started=None):
    """Write every output of a run (:data:`OUTPUT_FILES`) of ``result`` (a
    :class:`URSAMLib.result.SegmentationResult`) into ``out_dir``, atomically as a folder.

    ``boxes_info``: where the organs were localized, a box file
    ``boxes.json`` is written too, with this JSON beside the boxes each
    organ was prompted with (so that propagate's file holds the boxes it
    chose on each slice); ``extra_report``: more keys for report.json; ``started``: the run's
    ``time.perf_counter()`` at its start: report.json's ``total_seconds``
    then covers every step, writing included (and ``total_cpu_seconds``, from ``cpu_started``, the run's
    ``time.process_time()`` at its start).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    maps = result.output_maps()
    ensemble, rectified, u_full, unc_labels, names = (maps.ensemble, maps.rectified, maps.uncertainty,
                                                      maps.flagged, maps.organs)
    with staged_output_dir(out_dir, overwrite) as stage:
        ref = result.reference
        write_image(ensemble, ref, stage / "ensemble.nii.gz")
        write_image(u_full, ref, stage / "uncertainty.nii.gz")
        write_image(unc_labels, ref, stage / "uncertain.nii.gz")
        write_image(rectified, ref, stage / "rectified.nii.gz")
        write_seg_nrrd(rectified, ref, names, stage / "rectified.seg.nrrd")
        write_overview(result.volume, rectified, u_full, names, stage / "overview.png",
                       to_check=to_check_line(result.quality))
        if boxes_info is not None:
            save_boxes(result.boxes, stage / "boxes.json", extra=boxes_info)
        for name, writer in (extra_files or {}).items():
            writer(stage / name)
        components = flagged_components(unc_labels, u_full, names, result.voxel_ml,
                                        error_probability=result.error_map(),
                                        segmented=organ_voxels(rectified, names))
        result.timings["write_seconds"] = time.perf_counter() - t0
        result.timings["write_cpu_seconds"] = time.process_time() - c0
        if started is not None:
            result.timings["total_seconds"] = time.perf_counter() - started
        if cpu_started is not None:
            result.timings["total_cpu_seconds"] = time.process_time() - cpu_started
        report = result.report(ensemble, rectified, unc_labels)
        report["flagged_components"] = [c.to_json() for c in components]
        for organ in report["organs"]:
            organ["flagged_regions"] = sum(c.label == organ["label"] for c in components)
        report.update(extra_report or {})
        write_json(report, stage / "report.json")
    return out_dir
