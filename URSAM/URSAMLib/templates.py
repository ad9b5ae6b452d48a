"""The template library: labelled support scans for auto-localization (METHOD.md §1).

A library is a folder in the dataset layout of ``shared/data/README.md``::

    LIB/dataset.json                {"labels": {"1": "Brainstem", ...}, "support": [ids], ...}
    LIB/cases/<id>/image.nii.gz     CT in HU (any format SimpleITK reads: .nii, .nrrd, .mha)
    LIB/cases/<id>/labels.nii.gz    label map on the image's grid, or labels.seg.nrrd (Slicer)

The support templates are the ids in ``support``; a library without a
``support`` list uses every case that has a label map. Everything here is
headless (no Slicer, no Qt), so the CLI and the Slicer logic share it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_write_text, staged_dir
from .errors import URSAMError
from .imageio import IMAGE_SUFFIXES, check_volume, read_image, read_labels, write_image, write_sitk

#: name patterns of a case's files, in the order they are looked for
IMAGE_NAMES = tuple(f"image{s}" for s in IMAGE_SUFFIXES if s != ".dcm")
LABEL_NAMES = ("labels.seg.nrrd",) + tuple(f"labels{s}" for s in IMAGE_SUFFIXES if s != ".dcm")
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _find(folder, names):
    for name in names:
        path = folder / name
        if path.is_file():
            return path
    return None


@dataclass
class Template:
    """One labelled scan of a library."""
    case_id: str
    image_path: Path
    labels_path: Path
    names: dict

    def read_image(self):
        """The CT as a float32 SimpleITK image (HU)."""
        image = read_image(self.image_path, "template image")
        check_volume(image, self.image_path)
        return sitk.Cast(image, sitk.sitkFloat32)

    def read_labels(self, reference=None):
        """``(sitk image, int32 array [z, y, x])``, values as in the library's names."""
        image, array = read_labels(self.labels_path, reference, what="template label map")
        segments = getattr(image, "segments", None)
        if segments:
            array = _relabel_segments(array, segments, self.names, self.labels_path)
        return image, array


def _relabel_segments(array, segments, names, path):
    """A .seg.nrrd's segments matched to the library's names by name (case-insensitive)."""
    by_name = {v.lower(): k for k, v in names.items()}
    out = np.zeros(array.shape, np.int32)
    for seg in segments:
        name = str(seg.get("name", "")).lower()
        value = by_name.get(name, seg["labelValue"] if int(seg["labelValue"]) in names else None)
        if value is None:
            continue
        out[array == int(seg["labelValue"])] = int(value)
    return out


def file_digest(path):
    """SHA-256 of a file's bytes, or of every file of a folder (a DICOM series) with their names;
    ``"missing"`` where there is nothing to read (the scan then fails with its own message)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        return "missing"
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        try:
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            digest.update(b"unreadable")
    return digest.hexdigest()


class Library:
    """A template library folder. ``Library(path)`` reads and checks ``dataset.json``.

    ``names`` maps label values to organ names; ``templates(organs)`` gives the
    support scans; ``label_of(name_or_value)`` resolves an organ.
    """

    def __init__(self, path, role="support"):
        self.path = Path(path)
        self.role = role
        self.meta_path = self.path / "dataset.json"
        if not self.path.is_dir():
            raise URSAMError("template library folder not found", self.path)
        if not self.meta_path.is_file():
            raise URSAMError("template library has no dataset.json", self.meta_path)
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise URSAMError(f"dataset.json is not valid JSON ({getattr(err, 'msg', err)})",
                             self.meta_path) from None
        if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict) or not meta["labels"]:
            raise URSAMError('dataset.json needs a "labels" map of values to organ names, '
                             'e.g. {"labels": {"1": "liver"}}', self.meta_path)
        try:
            self.names = {int(k): str(v) for k, v in meta["labels"].items()}
        except ValueError:
            raise URSAMError('dataset.json "labels" keys must be integer label values', self.meta_path) from None
        if any(k <= 0 or k > 65535 for k in self.names):
            raise URSAMError("dataset.json label values must be 1..65535 (0 is background)", self.meta_path)
        lowered = [v.lower() for v in self.names.values()]
        if len(set(lowered)) != len(lowered):
            raise URSAMError("dataset.json names an organ twice", self.meta_path)
        for key in ("support", "query", "extra"):
            if key in meta and not (isinstance(meta[key], list) and all(isinstance(c, str) for c in meta[key])):
                raise URSAMError(f'dataset.json "{key}" must be a list of case ids', self.meta_path)
        self.meta = meta

    # -- creating -----------------------------------------------------------------------------
    @classmethod
    def create(cls, path, names, name=None):
        """A new, empty library with these label names (``{value: name}``)."""
        path = Path(path)
        if not names:
            raise URSAMError("a new template library needs organ names (give --names dataset.json)", path)
        if (path / "dataset.json").exists():
            raise URSAMError("a template library already exists here", path / "dataset.json")
        if path.exists() and not path.is_dir():
            raise URSAMError("library path exists and is not a folder", path)
        (path / "cases").mkdir(parents=True, exist_ok=True)
        meta = {"name": name or path.name, "modality": "CT",
                "labels": {str(k): v for k, v in sorted(names.items())}, "support": []}
        atomic_write_text(path / "dataset.json", json.dumps(meta, indent=1))
        return cls(path)

    def _save_meta(self):
        atomic_write_text(self.meta_path, json.dumps(self.meta, indent=1))

    # -- reading ------------------------------------------------------------------------------
    def case_ids(self, role=None):
        """Case ids of a role (``support``, ``query``, ``extra``); role None: the library's role; a library
        opened with role None: every case folder."""
        role = role or self.role
        if role is None:
            folder = self.path / "cases"
            return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if role in self.meta:
            return list(self.meta[role])
        if role == "support":
            folder = self.path / "cases"
            return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        raise URSAMError(f'dataset.json has no "{role}" list of case ids', self.meta_path)

    def case(self, case_id, need_labels=True):
        folder = self.path / "cases" / case_id
        if not folder.is_dir():
            raise URSAMError(f"case {case_id!r} listed in dataset.json has no folder", folder)
        image = _find(folder, IMAGE_NAMES)
        if image is None:
            raise URSAMError(f"case {case_id!r} has no image file (image.nii.gz, image.nrrd, ...)", folder)
        labels = _find(folder, LABEL_NAMES)
        if labels is None and need_labels:
            raise URSAMError(f"case {case_id!r} has no label map (labels.nii.gz or labels.seg.nrrd)", folder)
        return Template(case_id, image, labels, self.names)

    def label_of(self, organ):
        """Label value of an organ given by name (case-insensitive) or value."""
        if isinstance(organ, (int, np.integer)) or str(organ).isdigit():
            value = int(organ)
            if value in self.names:
                return value
        else:
            for k, v in self.names.items():
                if v.lower() == str(organ).lower():
                    return k
        raise URSAMError(f"organ {organ!r} is not in the library's labels "
                         f"({', '.join(self.names.values())})", self.meta_path)

    def resolve_organs(self, organs=None):
        """``{value: name}`` of the requested organs (None: all of the library's)."""
        if organs is None:
            return dict(self.names)
        if isinstance(organs, str):
            organs = [o.strip() for o in organs.split(",") if o.strip()]
        out = {}
        for organ in organs:
            value = self.label_of(organ)
            out[value] = self.names[value]
        if not out:
            raise URSAMError("no organs requested", self.meta_path)
        return out

    def without(self, case_id):
        """The same library less one support scan (leave-one-out calibration); nothing is written."""

        other = copy.copy(self)
        other.meta = {**self.meta, "support": [c for c in self.case_ids() if c != case_id]}
        return other

    def templates(self):
        """The support templates (their files are found, not yet read)."""
        ids = self.case_ids()
        if not ids:
            raise URSAMError("template library has no support scans", self.meta_path)
        return [self.case(c) for c in ids]

    # -- checking -----------------------------------------------------------------------------

    def digest(self):
        """SHA-256 of the library: dataset.json and every support's image and labels (their bytes)."""
        digest = hashlib.sha256(self.meta_path.read_bytes())
        for template in self.templates():
            for f in (template.image_path, template.labels_path):
                if f is not None:
                    digest.update(file_digest(f).encode())
        return digest.hexdigest()
    def check(self, organs=None, progress=None):
        """Read every support scan and label map, check grids and organs.

        Returns ``{"organs": {name: n_scans}, "scans": [{"id", "size", "spacing", "organs"}]}``.
        Raises URSAMError naming the file on the first problem, and if a
        requested organ is labelled in none of the scans.
        """
        wanted = self.resolve_organs(organs)
        scans, counts = [], {name: 0 for name in self.names.values()}
        ids = self.case_ids()
        if not ids:
            raise URSAMError("template library has no support scans", self.meta_path)
        for i, case_id in enumerate(ids):
            if progress:
                progress.step(i, len(ids))
            t = self.case(case_id)
            image = read_image(t.image_path, "template image")
            check_volume(image, t.image_path)
            _, labels = t.read_labels(reference=image)
            present = sorted(int(v) for v in np.unique(labels) if v != 0)
            unknown = [v for v in present if v not in self.names]
            if unknown:
                raise URSAMError(f"label map has values {unknown} that dataset.json does not name", t.labels_path)
            for v in present:
                counts[self.names[v]] += 1
            scans.append({"id": case_id, "size": list(image.GetSize()),
                          "spacing": [round(s, 3) for s in image.GetSpacing()],
                          "organs": [self.names[v] for v in present]})
        missing = [name for v, name in wanted.items() if counts[name] == 0]
        if missing:
            raise URSAMError(f"no support scan labels {', '.join(missing)}", self.meta_path)
        return {"organs": counts, "scans": scans}

    def support_organs(self):
        """``{case id: [organ names]}``: which organs each support labels (a support may label any subset of
        the library's organs). Kept in dataset.json by :meth:`add`; read from the label maps for a support
        added by hand."""
        known = self.meta.get("organs_of_supports", {})
        out = {}
        for case_id in self.case_ids():
            if case_id not in known:
                _, labels = self.case(case_id).read_labels()
                known[case_id] = [self.names[int(v)] for v in np.unique(labels) if int(v) in self.names]
            out[case_id] = list(known[case_id])
        return out

    def organ_counts(self):
        """``{organ name: how many supports label it}``, in the library's label order."""
        held = self.support_organs()
        return {name: sum(name in organs for organs in held.values()) for _, name in sorted(self.names.items())}

    # -- adding -------------------------------------------------------------------------------
    def add(self, image_path, labels_path, case_id=None, names=None):
        """Copy a user's labelled CT into the library as a new support scan.

        The image is stored as NIfTI (DICOM folders are converted); the labels as a
        NIfTI label map with the library's values. ``names`` (``{value: name}``)
        says what the label values of ``labels_path`` mean; organs new to the
        library get new label values. A .seg.nrrd brings its own segment names.
        """
        image = read_image(image_path, "image")
        check_volume(image, image_path)
        label_image, array = read_labels(labels_path, reference=image)
        segments = getattr(label_image, "segments", None)
        if segments:
            source_names = {int(s["labelValue"]): str(s.get("name") or f"label_{s['labelValue']}")
                            for s in segments}
        elif names is not None:
            source_names = dict(names)
        else:
            source_names = dict(self.names)
        present = sorted(int(v) for v in np.unique(array) if v != 0)
        if not present:
            raise URSAMError("label map is empty (no labelled voxel)", labels_path)
        unnamed = [v for v in present if v not in source_names]
        if unnamed:
            raise URSAMError(f"label values {unnamed} have no name; give --names dataset.json", labels_path)
        remap = {}
        for v in present:
            name = source_names[v]
            try:
                target = self.label_of(name)
            except URSAMError:
                target = max(self.names, default=0) + 1
                self.names[target] = name
                self.meta["labels"][str(target)] = name
            remap[v] = target
        out = np.zeros(array.shape, np.uint16 if max(remap.values()) > 255 else np.uint8)
        for v, target in remap.items():
            out[array == v] = target

        case_id = case_id or _new_id(Path(image_path), self.case_ids())
        if not _CASE_ID.match(case_id):
            raise URSAMError(f"case id {case_id!r} must be letters, digits, '_', '-' or '.'", self.meta_path)
        folder = self.path / "cases" / case_id
        if folder.exists():
            raise URSAMError(f"case {case_id!r} already exists in the library", folder)

        with staged_dir(folder) as tmp:
            write_sitk(image, tmp / "image.nii.gz")
            write_image(out, image, tmp / "labels.nii.gz")
        self.meta.setdefault("support", [])
        self.meta["support"].append(case_id)
        self.meta.setdefault("organs_of_supports", {})[case_id] = [self.names[remap[v]] for v in present]
        self._save_meta()
        return case_id, {remap[v]: self.names[remap[v]] for v in present}


    def add_folder(self, source, case_ids=None):
        """Every labelled case of ``source`` (a :class:`Library` of a dataset folder; ``case_ids``: only
        these), added as :meth:`add` adds one, with the source's label names. Returns ``[(case id, organs)]``.
        Cases already in the library (by id) and cases without a label map are passed over."""
        have = set(self.case_ids())
        ids = case_ids if case_ids is not None else source.case_ids()
        unknown = [c for c in ids if not (source.path / "cases" / c).is_dir()]
        if unknown:
            raise URSAMError(f"the dataset folder has no case {', '.join(unknown[:3])}", source.path)
        added = []
        for case_id in ids:
            if case_id in have:
                continue
            template = source.case(case_id, need_labels=False)
            if template.labels_path is None:
                continue
            added.append(self.add(template.image_path, template.labels_path, case_id=case_id,
                                  names=source.names))
        return added


def _new_id(image_path, existing):
    base = image_path.name
    for suffix in IMAGE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._-") or "case"
    if base in ("image", "ct", "CT"):
        base = image_path.parent.name or base
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._-") or "case"
    case_id, n = base, 1
    while case_id in existing:
        n += 1
        case_id = f"{base}_{n}"
    return case_id


def open_or_create(path, names=None):
    """The library at ``path``; a new one (with ``names``) where the folder has no dataset.json."""
    path = Path(path)
    if (path / "dataset.json").exists():
        return Library(path)
    if path.exists() and path.is_dir() and any(path.iterdir()):
        raise URSAMError("folder is not empty and holds no dataset.json; not a template library", path)
    return Library.create(path, names or {})
