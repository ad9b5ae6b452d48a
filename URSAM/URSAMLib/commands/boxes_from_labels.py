"""``ursam boxes-from-labels``: a box file from a label map (and the manual-prompt baseline)."""
from __future__ import annotations

from ..boxes import boxes_from_labels, read_names, save_boxes
from ..errors import URSAMError
from ..imageio import read_labels


def add_parser(sub):
    p = sub.add_parser("boxes-from-labels", help="write a box file from a label map",
                       description="Write the tight 3D box of each labelled organ. With --perturb-px, each "
                                   "in-plane side moves outward by a random 0..MAX px of SAM's 1024 grid "
                                   "(the paper's simulated manual prompt).")
    p.add_argument("labels", help="label map (NIfTI, NRRD, MHA or .seg.nrrd)")
    p.add_argument("--names", required=True, help="dataset.json (or a JSON map) of label values to names")
    p.add_argument("--out", required=True, help="box file to write")
    p.add_argument("--perturb-px", type=float, default=0.0, help="MAX outward shift in 1024-grid px")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


def main(args):
    names = read_names(args.names)
    _, labels = read_labels(args.labels)
    boxes = boxes_from_labels(labels, names, args.perturb_px, args.seed)
    if not boxes:
        raise URSAMError("label map holds none of the labels named in the names file", args.labels)
    save_boxes(boxes, args.out)
    print(f"wrote {len(boxes)} boxes to {args.out}")
    return 0
