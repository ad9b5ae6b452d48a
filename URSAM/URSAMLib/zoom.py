"""SAM's view of a scan, zoomed to the organs (an option of the slice-adaptive prompt modes, issue 8).

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
