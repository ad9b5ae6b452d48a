"""SAM's views of a scan: zoomed to the organs, and embeddings shared between runs on one scan.

SAM-family encoders see a slice resized to a fixed grid (LiteMedSAM: 256 px
for the whole slice, METHOD.md §2); on a 128 x 128 head-and-neck CT at 4-5 mm
a spinal cord is then 6-8 px wide, and the mask decoder works at a quarter of
that. :class:`ZoomedBackend` hands the backend, on every slice, the same crop
of the scan: the in-plane bounding box of all organ regions, so SAM sees the
organs at up to several times the resolution. Boxes are moved into the crop
and the masks pasted back onto the slice; nothing else changes (one encoder
pass per slice, every organ decoded against it, the intensity used by
rectification is the full slice's).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: the crop is never narrower than this fraction of the slice side, so a single small organ
#: is not blown up past the scales SAM was trained on
MIN_FRACTION = 0.25


def organ_crop(boxes, shape_zyx, pad=0.25, min_fraction=MIN_FRACTION):
    """``(y0, y1, x0, x1)``: the in-plane box around every box in ``boxes`` (any prompt set),
    grown by ``pad`` of its side, at least ``min_fraction`` of the slice, inside the slice."""
    boxes = list(boxes)
    height, width = shape_zyx[1], shape_zyx[2]
    if not boxes:
        return 0, height, 0, width
    lo = np.min([b.min_ijk[:2] for b in boxes], axis=0)
    hi = np.max([b.max_ijk[:2] for b in boxes], axis=0) + 1
    out = []
    for a, b, n in ((lo[1], hi[1], height), (lo[0], hi[0], width)):
        side = b - a
        side = max(side + 2 * int(np.ceil(pad * side)), int(np.ceil(min_fraction * n)), 1)
        side = min(side, n)
        start = int(np.clip((a + b - side) // 2, 0, n - side))
        out += [start, start + side]
    return tuple(int(v) for v in out)


class ZoomedBackend:
    """A SAM backend that embeds and decodes every slice within one fixed crop ``(y0, y1, x0, x1)``."""

    def __init__(self, backend, crop):
        self.backend = backend
        self.crop = tuple(int(v) for v in crop)
        self._shape = None

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def set_volume(self, volume):
        self._shape = volume.shape[1:]
        self.backend.set_volume(volume)

    def embed(self, slice2d):
        y0, y1, x0, x1 = self.crop
        self._shape = slice2d.shape
        return self.backend.embed(np.ascontiguousarray(slice2d[y0:y1, x0:x1]))

    def _to_crop(self, boxes):
        y0, y1, x0, x1 = self.crop
        b = np.asarray(boxes, np.float32).reshape(-1, 4) - np.array([x0, y0, x0, y0], np.float32)
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, x1 - x0 - 1)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, y1 - y0 - 1)
        return b

    def _paste(self, probs):
        y0, y1, x0, x1 = self.crop
        out = np.zeros((len(probs),) + tuple(self._shape), np.float32)
        out[:, y0:y1, x0:x1] = probs
        return out

    def decode(self, embedding, boxes_xyxy):
        return self._paste(self.backend.decode(embedding, self._to_crop(boxes_xyxy)))

    def decode_regions(self, embedding, boxes_xyxy, regions, batch=16):
        """Each box's probabilities over its region of the full slice (zero outside the crop)."""
        boxes = self._to_crop(boxes_xyxy)
        y0, y1, x0, x1 = self.crop
        inner = []
        for rows, cols in regions:
            # The part of each region inside the crop, in crop coordinates (the rest is zero).
            inner.append((slice(max(rows.start, y0) - y0, max(min(rows.stop, y1), y0) - y0),
                          slice(max(cols.start, x0) - x0, max(min(cols.stop, x1), x0) - x0)))
        crops = self.backend.decode_regions(embedding, boxes, inner, batch=batch)
        out = []
        for (rows, cols), c in zip(regions, crops):
            r = np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.float32)
            ry, rx = max(rows.start, y0) - rows.start, max(cols.start, x0) - cols.start
            r[ry:ry + c.shape[0], rx:rx + c.shape[1]] = c
            out.append(r)
        return out

    def describe(self):
        return {**self.backend.describe(), "zoom_crop_yx": list(self.crop)}


class SharedEmbeddings:
    """A backend that embeds each slice of a volume once across several pipeline runs.

    ``ursam evaluate --prompts box3d,slice,propagate`` runs the method once
    per mode on the same scan; the image embedding depends only on the slice
    (and the view of it), so the modes that see the same view share it. Holds the embeddings of one volume at a time
    (cleared by ``set_volume`` with another array); ``encoder_calls`` counts
    the real encoder calls.
    """

    def __init__(self, backend):
        self.backend = backend
        self._volume = None
        self._cache = {}
        self.encoder_seconds = {}

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def set_volume(self, volume):
        if volume is not self._volume:
            self._volume = volume
            self._cache = {}
            self.encoder_seconds = {}
        self.backend.set_volume(volume)

    def _key(self, slice2d):
        base = self._volume.__array_interface__["data"][0] if self._volume is not None else None
        ptr = slice2d.__array_interface__["data"][0]
        if base is None or slice2d.base is None:
            return None
        return (ptr - base) // max(1, slice2d.nbytes)

    def embed(self, slice2d):
        # Each user gets its own copy of the embedding's dict: what a decoder derives from it per slice (the
        # fast decoder's state, several times the embedding's size) goes with that copy, not into the cache.
        key = self._key(slice2d)
        if key is not None and key in self._cache:
            return dict(self._cache[key])
        t0 = time.perf_counter()
        emb = self.backend.embed(slice2d)
        if key is not None:
            self._cache[key] = dict(emb)
            self.encoder_seconds[key] = time.perf_counter() - t0
        return emb

    def clear(self):
        self._volume = None
        self._cache = {}


class Views:
    """SAM's views of one scan: the whole slice (crop None) or a crop ``(y0, y1, x0, x1)``.

    ``share``: each view embeds a slice once across all the runs that use it
    (:class:`SharedEmbeddings`); a view is built once per crop. Without it,
    each call gives a fresh view (a single run embeds each slice once anyway).
    ``encoder_calls`` counts the model's real encoder calls.
    """

    def __init__(self, backend, share=False):
        self.backend = backend
        self.share = share
        self._views = {}

    @property
    def encoder_calls(self):
        return self.backend.encoder_calls

    def view(self, crop=None):
        key = None if crop is None else tuple(int(v) for v in crop)
        if key in self._views:
            return self._views[key]
        view = self.backend if key is None else ZoomedBackend(self.backend, key)
        if self.share:
            view = self._views[key] = SharedEmbeddings(view)
        return view


class EmbedAhead:
    """The encoder one slice ahead of the decoder: while slice k is decoded, slice k + 1 is embedded
    on a worker thread. Each slice is still embedded once, in the same order, so the masks are the same.

    It pays where the encoder runs outside torch's thread pool (OpenVINO), so that encoder and decoder
    share the cores instead of taking turns; a backend says so with ``embeds_ahead``
    (:meth:`where_it_pays`).
    """

    def __init__(self, backend, volume, zs):
        self.backend, self.volume, self.zs = backend, volume, list(zs)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ursam-encoder")
        self.pending = {}
        self.next = 0
        self._submit()

    @classmethod
    def where_it_pays(cls, backend, volume, zs):
        """An :class:`EmbedAhead` over ``zs`` where the backend gains from it, else None."""
        if not zs or not getattr(backend, "embeds_ahead", False):
            return None
        return cls(backend, volume, zs)

    @staticmethod
    def now(backend, slice2d):
        """``(embedding, seconds)`` of one slice, embedded here."""
        t0 = time.perf_counter()
        return backend.embed(slice2d), time.perf_counter() - t0

    def _submit(self):
        if self.next < len(self.zs):
            z = self.zs[self.next]
            self.pending[z] = self.pool.submit(self.now, self.backend, self.volume[z])
            self.next += 1

    def take(self, z):
        """Slice ``z``'s ``(embedding, encoder seconds)``; starts the next slice's."""
        future = self.pending.pop(z, None)
        if future is None:  # off the planned order: embed it here
            return self.now(self.backend, self.volume[z])
        out = future.result()
        self._submit()
        return out

    def close(self):
        for future in self.pending.values():
            future.cancel()
        self.pending = {}
        self.pool.shutdown(wait=True)
