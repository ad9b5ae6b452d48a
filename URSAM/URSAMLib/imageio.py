"""Reading and writing images through SimpleITK, with the input checks.

Arrays follow SimpleITK's numpy view: ``array[z, y, x]``. Every image the
engine writes copies origin, spacing and direction from the input.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path
from .dicom.series import DicomSeries, find_series, read_series
from .errors import URSAMError

# ITK's own warnings (metadata it drops, and the like) would drown the CLI's one-line messages.
sitk.ProcessObject_SetGlobalWarningDisplay(False)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def _read_dicom_series(folder, series=None):
    """A DICOM CT series, checked (which series, CT, gaps, orientation) by its one reader; ``series``: its
    Series Instance UID where the folder holds several, or the :class:`DicomSeries` already found."""
    return read_series(series if isinstance(series, DicomSeries) else find_series(folder, series))


def _stream_length(handle, gz):
    """Bytes left in ``handle``, decompressed if ``gz``; a cut-off gzip stream counts what it holds."""
    total = 0
    if not gz:
        try:
            while block := handle.read(1 << 16):
                total += len(block)
        except (EOFError, zlib.error, OSError):
            pass  # a cut-off .gz file: what was readable is what counts
        return total
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    while block := handle.read(1 << 22):
        try:
            total += len(inflate.decompress(block))
        except zlib.error:
            return total
    return total


def _nifti_header(head):
    """``(datatype, dims, vox_offset, scl_slope, scl_inter, endian)`` of a NIfTI-1 or NIfTI-2 header."""
    if len(head) < 348:
        return None
    (sizeof_hdr,) = struct.unpack("<i", head[:4])
    endian = "<" if sizeof_hdr in (348, 540) else ">"
    if struct.unpack(endian + "i", head[:4])[0] == 540:
        if len(head) < 540:
            return None
        datatype = struct.unpack(endian + "h", head[12:14])[0]
        dims = struct.unpack(endian + "8q", head[16:80])
        offset = struct.unpack(endian + "q", head[168:176])[0]
        slope, inter = struct.unpack(endian + "2d", head[176:192])
    else:
        datatype = struct.unpack(endian + "h", head[70:72])[0]
        dims = struct.unpack(endian + "8h", head[40:56])
        offset = struct.unpack(endian + "f", head[108:112])[0]
        slope, inter = struct.unpack(endian + "2f", head[112:120])
    return datatype, dims, int(offset), slope, inter, endian


def _data_offset_and_gz(path, head):
    """Where the voxels start in a single-file image, and whether they are gzip-compressed."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        header = _nifti_header(head)
        return None if header is None else (header[2], False)
    if name.endswith(".nrrd") or name.endswith(".mha"):
        marker = b"\n\n" if name.endswith(".nrrd") else b"ElementDataFile = LOCAL"
        at = head.find(marker)
        if at < 0:
            return None
        header = head[:at].decode("latin-1").lower()
        if name.endswith(".mha"):
            at = head.index(b"\n", at)
            gz = "compresseddata = true" in header
            if gz:  # MHA compresses with raw zlib, not gzip: leave it to ITK.
                return None
        else:
            gz = "encoding: gzip" in header or "encoding: gz" in header
            if "data file:" in header or "datafile:" in header:
                return None
        return at + (2 if name.endswith(".nrrd") else 1), gz
    return None


#: NIfTI datatype codes of float voxels (float32, float64), the ones that can hold NaN or infinity
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def nifti_has_nonfinite(path):
    """Whether a float NIfTI file holds NaN or infinite voxels, read from the file's own bytes.

    ITK's NIfTI reader returns NaN and infinite voxels as 0, so the array it
    gives cannot show them; every other file (and every integer NIfTI) is False.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")) or not path.is_file():
        return False
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = _nifti_header(handle.read(540))
            if header is None or header[0] not in _NIFTI_FLOATS:
                return False
            # No scaling: scl_slope and scl_inter cannot make a NaN or infinite voxel finite, and a finite
            # one they scale past float32 read_ct finds in the array.
            datatype, dims, offset, _, _, endian = header
            ndim = int(dims[0])
            if not 1 <= ndim <= 7:
                return False
            left = int(np.prod([max(int(d), 1) for d in dims[1:ndim + 1]]))
            dtype = np.dtype(endian + _NIFTI_FLOATS[datatype])
            handle.seek(offset)
            per_block = (1 << 22) // dtype.itemsize
            while left > 0:
                block = handle.read(min(left, per_block) * dtype.itemsize)
                values = np.frombuffer(block[: len(block) - len(block) % dtype.itemsize], dtype)
                if not values.size:
                    return False  # cut short: check_complete reports it
                if not np.isfinite(values).all():
                    return True
                left -= values.size
    except (OSError, EOFError, zlib.error, struct.error):
        return False  # unreadable: the reader says so with its own message
    return False


def check_complete(path, image_info):
    """ITK fills a truncated file with zeros; compare the bytes there with the bytes the header promises."""
    path = Path(path)
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(1 << 16)
        found = _data_offset_and_gz(path, head)
        if found is None:
            return
        offset, gz = found
        with opener(path, "rb") as handle:
            handle.seek(offset)
            have = _stream_length(handle, gz)
    except (OSError, EOFError, zlib.error, struct.error):
        have = -1
    need = int(np.prod(image_info.GetSize())) * image_info.GetNumberOfComponents() * _bytes_per_component(image_info)
    if have < need:
        raise URSAMError(f"image file is truncated or corrupt ({max(have, 0)} of {need} voxel bytes)", path)


def _bytes_per_component(reader):
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    for bits, size in (("64", 8), ("32", 4), ("16", 2), ("8", 1)):
        if bits in pixel:
            return size
    return 4 if "float" in pixel else 8 if "double" in pixel else 1


def read_image(path, what="image", series=None):
    """Read a file or a DICOM folder (``series``: its Series Instance UID, where it holds several), without
    checking what it holds."""
    path = Path(path)
    if not path.exists():
        raise URSAMError(f"{what} not found", path)
    if series and not path.is_dir():
        raise URSAMError("--series chooses a series of a DICOM folder; this input is a file", path)
    try:
        if path.is_dir():
            return _read_dicom_series(path, series)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        check_complete(path, reader)
        return reader.Execute()
    except URSAMError:
        raise
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "Could not" in ln or "Unable" in ln), "")
        detail = f" ({detail.split(':')[-1].strip()})" if detail else ""
        raise URSAMError(f"cannot read {what}: not an image or a corrupt file{detail}", path) from None


def read_ct(path, series=None):
    """Read a 3D scan and check that the pipeline can use it (``series``: see :func:`read_image`).

    Returns ``(image, array)``, ``array`` as float32 [z, y, x].
    """
    image = read_image(path, "image", series)
    check_volume(image, path)
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if nifti_has_nonfinite(path):
        raise URSAMError("image has NaN or infinite voxels", path)
    _check_voxels(array, path)
    ref = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    ref.CopyInformation(image)
    return ref, array


#: how ``modality`` names what a scan is: CT in HU, another modality, or decided from its intensities
MODALITIES = ("auto", "ct", "other")


@dataclass
class Scan:
    """A scan as the method reads it (the first step of a run).

    ``reference``: the grid (an empty UInt8 image with the scan's size,
    origin, spacing and direction); ``volume``: its voxels as float32
    [z, y, x]; ``source``: what the localizer reads (the file's path, or a
    SimpleITK image in HU for a scan given in memory); ``percentile``:
    0.5-99.5 percentile normalization instead of CT windowing (the scan is
    not CT in HU).
    """
    reference: sitk.Image
    volume: np.ndarray
    source: Union[str, sitk.Image]
    name: str
    percentile: bool = False
    #: the DICOM series it was read from (None for a file or a scan in memory)
    dicom: Optional[DicomSeries] = None

    @classmethod
    def in_memory(cls, image, name="volume"):
        """A scan of a SimpleITK image in memory (the Slicer worker's input), checked as a file is."""
        check_volume(image, name)
        volume = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        _check_voxels(volume, name)
        ref = sitk.Image(image.GetSize(), sitk.sitkUInt8)
        ref.CopyInformation(image)
        return cls(ref, volume, sitk.Cast(image, sitk.sitkFloat32), name)


def read_scan(image, modality="auto", warn: Optional[Callable[[str], None]] = None, series=None):
    """The run's :class:`Scan`: ``image`` is a path (NIfTI, NRRD, MHA, a DICOM series folder; ``series``: the
    Series Instance UID where the folder holds several) or a :class:`Scan` already in memory. ``modality``
    (:data:`MODALITIES`) decides the normalization; with ``auto`` a scan that does not look like a CT in HU is
    normalized by percentiles, with a warning."""
    if modality not in MODALITIES:
        raise URSAMError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    if isinstance(image, Scan):
        scan = image
    else:
        found = find_series(image, series) if Path(image).is_dir() else None
        reference, volume = read_ct(image, found or series)
        # the localizer reads a path itself; a series chosen from a folder of several goes as the image read
        source = str(image) if series is None else array_to_image(volume, reference)
        scan = Scan(reference, volume, source, str(Path(image).absolute()), dicom=found)
    percentile = modality == "other" or (modality == "auto" and not looks_like_ct(scan.volume))
    if percentile and modality == "auto" and warn is not None:
        warn(f"{scan.name} does not look like a CT in HU (no air near -1000): CT windowing does not apply, "
             "using 0.5-99.5 percentile normalization (set --modality ct to override)")
    return replace(scan, percentile=percentile)


def looks_like_ct(array):
    """CT in HU has air near -1000; MR and other scans have no negative values of that size.

    Judged on a strided sample so it stays cheap on big scans.
    """
    sample = array.ravel()[:: max(1, array.size // 2_000_000)]
    low = float(np.percentile(sample, 0.5))
    return low < -300.0


def _check_voxels(array, path):
    if not np.isfinite(array).all():
        raise URSAMError("image has NaN or infinite voxels", path)
    if float(array.max()) == float(array.min()):
        raise URSAMError("image is constant (every voxel has the same value)", path)


def check_volume(image, path):
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise URSAMError(
            f"image is a vector image ({image.GetNumberOfComponentsPerPixel()} components); "
            "a scalar 3D CT is needed", path)
    if image.GetDimension() != 3:
        raise URSAMError(f"image is {image.GetDimension()}D; a 3D CT is needed", path)
    size = image.GetSize()
    if min(size) < 2:
        raise URSAMError(f"image has size {size}; at least 2 voxels along every axis are needed", path)


def read_labels(path, reference=None, what="label map"):
    """Read an integer label map; if ``reference`` is given, its grid must match."""
    path = Path(path)
    if str(path).endswith(".seg.nrrd"):
        image = read_seg_nrrd_as_labelmap(path)
    else:
        image = read_image(path, what)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise URSAMError(f"{what} must be a scalar 3D image", path)
    if reference is not None:
        check_same_grid(image, reference, path, what)
    return image, sitk.GetArrayFromImage(image).astype(np.int32, copy=False)


def check_same_grid(image, reference, path, what):
    if image.GetSize() != reference.GetSize():
        raise URSAMError(f"{what} size {image.GetSize()} does not match the image size {reference.GetSize()}",
                         path)
    for name, a, b in (("spacing", image.GetSpacing(), reference.GetSpacing()),
                       ("origin", image.GetOrigin(), reference.GetOrigin()),
                       ("direction", image.GetDirection(), reference.GetDirection())):
        if not np.allclose(a, b, atol=1e-3 * max(1.0, float(np.max(np.abs(b))))):
            raise URSAMError(f"{what} {name} {tuple(round(v, 4) for v in a)} does not match the image's", path)


def read_seg_nrrd_as_labelmap(path):
    """A Slicer .seg.nrrd as one label map, label values from the segments."""

    try:
        import slicerio  # noqa: PLC0415 (not bundled with Slicer, whose panel imports this module before packages are installed)
        seg = slicerio.read_segmentation(str(path))
    except Exception as err:  # slicerio raises plain errors for bad headers
        raise URSAMError(f"cannot read segmentation ({err})", path) from None
    voxels = seg["voxels"]
    if voxels.ndim == 4:
        # Several layers: flatten, later layers win; overlapping segments are rare in templates.
        out = np.zeros(voxels.shape[:3], dtype=np.uint16)
        for segment in seg["segments"]:
            layer = segment.get("layer", 0)
            out[voxels[..., layer] == segment["labelValue"]] = segment["labelValue"]
        voxels = out
    # slicerio gives [i, j, k]; SimpleITK wants [k, j, i].
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(voxels, (2, 1, 0))).astype(np.uint16))
    ijk_to_lps = np.array(seg["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing(tuple(spacing))
    image.SetOrigin(tuple(ijk_to_lps[:3, 3]))
    image.SetDirection(tuple((ijk_to_lps[:3, :3] / spacing).flatten()))
    image.segments = seg["segments"]  # names travel with the image for templates
    return image


def array_to_image(array, reference):
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def write_image(array, reference, path, compress=True):
    """Write ``array`` on ``reference``'s grid, atomically (temp name, then rename)."""
    return write_sitk(array_to_image(array, reference), path, compress)


def write_sitk(image, path, compress=True):
    """Write a SimpleITK image, atomically."""

    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return Path(path)
