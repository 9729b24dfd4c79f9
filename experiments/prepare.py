"""Build the training-data cache that experiments/train.py memory-maps.

    python experiments/prepare.py celebamask-hq ROOT CACHE_DIR [--split train] [--size 256]
                                  [--masks exact|reference]
    python experiments/prepare.py aligned FACES_DIR CACHE_DIR      # already aligned faces
    python experiments/prepare.py photos PHOTOS_DIR CACHE_DIR [--recursive] [--min-face 64]

celebamask-hq: the official layout (CelebA-HQ-img/, CelebAMask-HQ-mask-anno/, the attribute
file), the reference's split, its 5 labels and the component masks: exactly binary
(--masks exact, the default) or the reference's soft masks (--masks reference: the union written
as a JPEG at quality 95, read back and resized with PIL bilinear, as the reference's
`data/process_dataset.py` and `data/dataset.py` do; for train.py --config=reference).
aligned: any folder of aligned face images, with STAND-IN annotations (central-box masks, all-zero
labels; say so in results). photos: ordinary photos; every face dlib finds becomes one row
`relpath#k` (k = 0 for the largest), aligned to a CelebA-HQ-like crop (idguard_jax.faces.align),
with masks made from its 68 landmarks, its 5 landmarks (always stored), labels from --labels
(default all zero) and the whole-face mask for L2_face in facemasks.u8.npy (N, S, S, 1); photos
without a face, unreadable ones and other files are reported by name.

One resumable pass (photos: after a detection pass over every file): re-running skips finished
images; unreadable images are reported by name and counted, and never stop the pass.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from idguard_jax import startup

DATASETS = ("celebamask-hq", "aligned", "photos")


def _parser() -> argparse.ArgumentParser:
    from idguard_jax.data.celebamask import MASK_PIPELINES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("root", help="the dataset folder")
    p.add_argument("cache", help="the cache folder (created; resumed if it exists)")
    p.add_argument("--split", default="train", choices=("train", "test", "all"),
                   help="celebamask-hq only: the reference's split (first 1000 rows = test)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--masks", default="exact", choices=MASK_PIPELINES,
                   help="celebamask-hq only: exact binary masks, or the reference's soft JPEG + "
                        "bilinear masks (for train.py --config=reference)")
    p.add_argument("--landmarks", action="store_true",
                   help="also store dlib's 5 landmarks of each face (for --set identity=dlib)")
    p.add_argument("--recursive", action="store_true", help="photos only: also sub-folders")
    p.add_argument("--min-face", type=int, default=64,
                   help="photos only: faces narrower than this (px) fail as too small")
    p.add_argument("--labels", default=None,
                   help="photos only: the 5 StarGAN attributes of every face, e.g. 0,1,0,0,1 "
                        "(default all zero)")
    return p


def _labels(text: str | None) -> list[float] | None:
    if text is None:
        return None
    labels = [float(v) for v in text.split(",")]
    if len(labels) != 5:
        raise ValueError(f"--labels: expected 5 comma-separated values, got {text!r}")
    return labels


def _log(line: str) -> None:
    print(line, file=sys.stderr)


def _prepare(args) -> tuple[dict, int]:
    """(the JSON summary, the exit status)."""
    from idguard_jax.data import prepare

    if args.masks != "exact" and args.dataset != "celebamask-hq":
        raise ValueError(f"--masks {args.masks}: only for celebamask-hq (the {args.dataset} "
                         "masks are binary)")
    if args.dataset == "photos":
        summary = prepare.prepare_photos(args.root, args.cache, size=args.size,
                                         min_face=args.min_face, labels=_labels(args.labels),
                                         recursive=args.recursive, log=_log)
        bad = summary["failed"] or summary["unreadable"] or summary["no_face"]
        return summary, 1 if bad or not summary["faces"] else 0
    if args.dataset == "celebamask-hq":
        counts = prepare.prepare_celebamask(args.root, args.cache, split=args.split,
                                            size=args.size, landmarks=args.landmarks,
                                            masks=args.masks, log=_log)
    else:
        counts = prepare.prepare_aligned(args.root, args.cache, size=args.size,
                                         landmarks=args.landmarks, log=_log)
    return {"cache": os.path.abspath(args.cache), **counts}, 1 if counts["failed"] else 0


@startup.command
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary, status = _prepare(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return status


if __name__ == "__main__":
    sys.exit(main())
