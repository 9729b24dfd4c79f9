"""Build the training-data cache that experiments/train.py memory-maps.

    python experiments/prepare.py celebamask-hq ROOT CACHE_DIR [--split train] [--size 256]
    python experiments/prepare.py aligned FACES_DIR CACHE_DIR      # already aligned faces

celebamask-hq: the official layout (CelebA-HQ-img/, CelebAMask-HQ-mask-anno/, the attribute
file), the reference's split, its 5 labels and the binary component masks. aligned: any folder of
aligned face images, with STAND-IN annotations (central-box masks, all-zero labels; say so in
results). One resumable pass: re-running skips finished images; unreadable images are reported
by name and counted, and never stop the pass.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATASETS = ("celebamask-hq", "aligned")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("root", help="the dataset folder")
    p.add_argument("cache", help="the cache folder (created; resumed if it exists)")
    p.add_argument("--split", default="train", choices=("train", "test", "all"),
                   help="celebamask-hq only: the reference's split (first 1000 rows = test)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--landmarks", action="store_true",
                   help="also store dlib's 5 landmarks of each face (for --set identity=dlib)")
    args = p.parse_args(argv)

    from idguard_jax import celebamask
    from idguard_jax.cache import build_cache
    from idguard_jax.data import central_face_mask
    from idguard_jax.images import list_images, read_rgb

    analyzer = None
    if args.landmarks:
        from idguard_jax.dlib_face import FaceAnalyzer
        analyzer = FaceAnalyzer()

    def landmarks_of(path):
        """Unit-coordinate landmarks found at the file's own resolution (None: no face)."""
        if analyzer is None:
            return None
        img = read_rgb(path)
        pts = analyzer.largest_face(img)
        return None if pts is None else pts / [img.shape[1], img.shape[0]]

    try:
        if args.dataset == "celebamask-hq":
            celebamask.check_layout(args.root)
            records = celebamask.read_attributes(args.root, args.split)
            names = [r.name for r in records]

            def load(i):
                image, mask = celebamask.load_record(args.root, records[i], args.size)
                path = os.path.join(args.root, celebamask.IMAGES, records[i].name)
                return image, mask, records[i].labels, landmarks_of(path)
            meta = {"dataset": "celebamask-hq", "root": os.path.abspath(args.root),
                    "split": args.split, "notes": [], "landmarks": args.landmarks}
        else:
            paths = list_images(args.root)
            names = [os.path.relpath(q, args.root) for q in paths]
            box = central_face_mask(args.size).astype("uint8")

            def load(i):
                return read_rgb(paths[i], args.size), box, [0.0] * 5, landmarks_of(paths[i])
            meta = {"dataset": "aligned", "root": os.path.abspath(args.root),
                    "notes": ["stand-in masks: central face box", "labels: all zero (none given)"],
                    "landmarks": args.landmarks}
        if not names:
            raise FileNotFoundError(f"{args.root}: no images found")
        counts = build_cache(args.cache, names, load, args.size, meta,
                             log=lambda line: print(line, file=sys.stderr))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"cache": os.path.abspath(args.cache), **counts}))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
