"""Prompt mode ``propagate``: each slice's box from the previous slice's ensemble mask.

It starts on the slice where the atlas prior's area is largest and moves
outward slice by slice: each slice gets the box of the previous slice's
ensemble mask, grown by a margin; where that mask vanishes or jumps (it
leaves the prior's box or balloons past it), the prior's box of that slice is
used instead; the sweep stops where both are empty. Because each box depends
on the masks so far, the mode hands the pipeline a slice plan
(:class:`Propagation`) that visits the slices in an order where each organ's
previous slice is finished first, while the encoder still runs once per
distinct slice: an embedding needed again later (a slice below an organ's
start, met on the way up) waits in a bounded cache.
"""
from __future__ import annotations

import numpy as np

from .boxes import bbox2d, box_area, box_iou_2d, grid_px_to_slice_px, grow_box


class Propagation:
    """The slice plan of ``propagate`` for :func:`URSAMLib.pipeline.run`.

    Called with the pipeline's organ maps, it yields steps ``(z, organs, keep)``:
    embed slice z (or take it from the cache), decode ``organs`` there with
    ``o.box.xyxy_at(z)``, then keep the embedding for later only if ``keep``.
    A step with no organs drops a cached embedding. Organs of the main prompt
    set whose label has a start propagate; all others (the manual baseline)
    are decoded on their own slices as usual.

    Order: one ascending sweep. An organ's slices above its start follow on
    the way up; its slices below the start are swept downward as soon as the
    start is done, reusing embeddings met on the way up (kept in the cache
    only while an organ still to sweep down may need them) or computing
    them then. So every slice is embedded once.
    """

    def __init__(self, starts, fallbacks, options, size_xyz):
        self.starts = dict(starts)
        self.fallbacks = fallbacks
        self.options = options
        self.size_xyz = size_xyz
        self.stops = {}

    # -- the box of one slice -----------------------------------------------------------------
    def _mask(self, o, z):
        k = z - o.sl[0].start
        p = o.p_mean if o.p_mean is not None else o.p_auto
        return p[k] > 0.5

    def next_box(self, o, z, prev):
        """The box of organ ``o`` on slice ``z`` from its finished slice ``prev``; None: stop here."""
        prior_box = self.fallbacks[o.label].get(z)
        m = self._mask(o, prev)
        if np.count_nonzero(m) >= self.options.min_mask_px:
            b = bbox2d(m)
            b[[0, 2]] += o.sl[2].start
            b[[1, 3]] += o.sl[1].start
            b = grow_box(b, grid_px_to_slice_px(self.options.grow_px, self.size_xyz), self.size_xyz)
            b = _clip_to(b, o.box)
            ref = prior_box if prior_box is not None else o.box.xyxy_at(prev)
            if ref is None or (box_area(b) <= self.options.jump_area * box_area(ref)
                               and box_iou_2d(b, ref) >= self.options.jump_iou):
                return b
        return prior_box

    # -- the plan ------------------------------------------------------------------------------
    def __call__(self, organs):
        prop = [o for o in organs if o.prompt_set == "main" and o.label in self.starts]
        static = [o for o in organs if all(o is not p for p in prop)]
        for o in prop:
            o.box.slice_boxes = {}
        z_lo = min([o.sl[0].start for o in organs], default=0)
        z_hi = max([o.sl[0].stop for o in organs], default=0)
        going_up = {id(o) for o in prop}
        down_pending = {id(o) for o in prop}
        cached = set()
        # LiteMedSAM and SAM embeddings are 256 x 64 x 64 float32: 4 MiB each.
        max_cached = max(1, int(self.options.cache_mib // 4))

        def wanted_later(z, exclude=None):
            return any(id(o) in down_pending and o is not exclude and o.sl[0].start <= z < self.starts[o.label]
                       for o in prop)

        def keep(z, exclude=None):
            k = wanted_later(z, exclude) and (z in cached or len(cached) < max_cached)
            (cached.add if k else cached.discard)(z)
            return k

        for z in range(z_lo, z_hi):
            group = [o for o in static if o.sl[0].start <= z < o.sl[0].stop and o.box.xyxy_at(z) is not None]
            for o in prop:
                s = self.starts[o.label]
                if z < s or id(o) not in going_up:
                    continue
                box = None
                if z < o.sl[0].stop:
                    box = self.fallbacks[o.label].get(z) if z == s else self.next_box(o, z, z - 1)
                if box is None:
                    going_up.discard(id(o))
                    self.stops[(o.label, "up")] = z - 1
                    continue
                o.box.slice_boxes[z] = [float(v) for v in box]
                group.append(o)
            if group:
                yield z, group, keep(z)
            for o in [o for o in prop if self.starts[o.label] == z]:
                # The start slice is done: sweep this organ down now.
                z2 = z - 1
                while z2 >= o.sl[0].start:
                    box = self.next_box(o, z2, z2 + 1)
                    if box is None:
                        break
                    o.box.slice_boxes[z2] = [float(v) for v in box]
                    yield z2, [o], keep(z2, exclude=o)
                    z2 -= 1
                self.stops[(o.label, "down")] = z2 + 1
                down_pending.discard(id(o))
                for zc in sorted(z for z in cached if not wanted_later(z)):
                    cached.discard(zc)
                    yield zc, [], False
        for o in prop:
            if id(o) in going_up:
                self.stops[(o.label, "up")] = o.sl[0].stop - 1
        for zc in sorted(cached):
            yield zc, [], False

    def describe(self):
        """Start and stop slices per organ label (for the report)."""
        return {int(label): {"start": int(s), "down_to": self.stops.get((label, "down")),
                             "up_to": self.stops.get((label, "up"))} for label, s in self.starts.items()}


def _clip_to(box, organ_box):
    """``box`` inside the organ's bounding region (which lies inside the image)."""
    out = box.copy()
    out[[0, 2]] = np.clip(out[[0, 2]], organ_box.min_ijk[0], organ_box.max_ijk[0])
    out[[1, 3]] = np.clip(out[[1, 3]], organ_box.min_ijk[1], organ_box.max_ijk[1])
    return out
