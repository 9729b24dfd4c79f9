"""Build the training-data cache that experiments/train.py memory-maps.

    python experiments/prepare.py celebamask-hq ROOT CACHE_DIR [--split train] [--size 256]
    python experiments/prepare.py aligned FACES_DIR CACHE_DIR      # already aligned faces
    python experiments/prepare.py photos PHOTOS_DIR CACHE_DIR [--recursive] [--min-face 64]

celebamask-hq: the official layout (CelebA-HQ-img/, CelebAMask-HQ-mask-anno/, the attribute
file), the reference's split, its 5 labels and the binary component masks. aligned: any folder of
aligned face images, with STAND-IN annotations (central-box masks, all-zero labels; say so in
results). photos: ordinary photos; every face dlib finds becomes one row `relpath#k` (k = 0 for
the largest), aligned to a CelebA-HQ-like crop (idguard_jax.faces.align), with masks made from its 68
landmarks, its 5 landmarks (always stored), labels from --labels (default all zero) and the
whole-face mask for L2_face in facemasks.u8.npy (N, S, S, 1); photos without a face, unreadable
ones and other files are reported by name.

One resumable pass (photos: after a detection pass over every file): re-running skips finished
images; unreadable images are reported by name and counted, and never stop the pass.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATASETS = ("celebamask-hq", "aligned", "photos")


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
    p.add_argument("--recursive", action="store_true", help="photos only: also sub-folders")
    p.add_argument("--min-face", type=int, default=64,
                   help="photos only: faces narrower than this (px) fail as too small")
    p.add_argument("--labels", default=None,
                   help="photos only: the 5 StarGAN attributes of every face, e.g. 0,1,0,0,1 "
                        "(default all zero)")
    args = p.parse_args(argv)
    if args.dataset == "photos":
        return _photos(args)

    from idguard_jax.data import celebamask
    from idguard_jax.data.cache import build_cache
    from idguard_jax.data.datasets import central_face_mask
    from idguard_jax.image_files import list_images, read_rgb

    analyzer = None
    if args.landmarks:
        from idguard_jax.faces.detection import FaceAnalyzer
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


def _photos(args) -> int:
    """The photos dataset: a detection pass over every file, then one cache row per face."""
    import functools

    import numpy as np

    from idguard_jax.faces.align import OK, analyse_photo
    from idguard_jax.data.cache import FACE_MASKS_FILE, build_cache
    from idguard_jax.faces.detection import FaceAnalyzer
    from idguard_jax.image_files import IMAGE_SUFFIXES

    try:
        labels = [0.0] * 5 if args.labels is None else [float(v) for v in args.labels.split(",")]
        if len(labels) != 5:
            raise ValueError(f"--labels: expected 5 comma-separated values, got {args.labels!r}")
        if not os.path.isdir(args.root):
            raise FileNotFoundError(f"{args.root}: no such folder")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = sorted(os.path.relpath(os.path.join(d, f), args.root)
                   for d, sub, fs in os.walk(args.root) if args.recursive or d == args.root
                   for f in fs)
    analyzer = FaceAnalyzer()

    @functools.lru_cache(maxsize=1)  # rows of one photo are loaded one after another
    def analyse(rel):
        return analyse_photo(os.path.join(args.root, rel), analyzer, args.size, args.min_face)

    # Detection pass: the row names must be known before the cache is laid out. Detection is
    # deterministic, so a resumed run finds the same rows.
    not_images, unreadable, no_face, names = [], {}, [], []
    for rel in files:
        if not rel.lower().endswith(IMAGE_SUFFIXES):
            not_images.append(rel)
            continue
        try:
            faces = analyse(rel)
        except ValueError as e:
            unreadable[rel] = str(e)
            continue
        if not faces:
            no_face.append(rel)
        names += [f"{rel}#{k}" for k in range(len(faces))]
    for rel in not_images:
        print(f"skipped (not an image suffix): {rel}", file=sys.stderr)
    for rel, reason in unreadable.items():
        print(f"unreadable: {reason}", file=sys.stderr)
    for rel in no_face:
        print(f"no face: {rel}", file=sys.stderr)

    face_masks = None  # opened once build_cache has accepted the cache folder

    def load(i):
        nonlocal face_masks
        rel, k = names[i].rsplit("#", 1)
        face = analyse(rel)[int(k)]
        if face.status != OK:
            raise ValueError(f"{names[i]}: face {face.status} (box {face.box.tolist()}, "
                             f"--min-face {args.min_face})")
        if face_masks is None:
            path = os.path.join(args.cache, FACE_MASKS_FILE)
            face_masks = np.lib.format.open_memmap(
                path, mode="r+" if os.path.exists(path) else "w+", dtype=np.uint8,
                shape=None if os.path.exists(path) else (len(names), args.size, args.size, 1))
        face_masks[i] = face.face_mask
        return face.image, face.component_mask, labels, face.landmarks5

    meta = {"dataset": "photos", "root": os.path.abspath(args.root), "landmarks": True,
            "min_face": args.min_face,
            "notes": ["masks: filled, dilated hulls of dlib's 68 landmarks (brows, eyes, nose, "
                      "mouth), not CelebAMask-HQ annotations",
                      f"labels: {'all zero (none given)' if args.labels is None else labels} "
                      "for every face"]}
    counts = {"done": 0, "failed": 0, "skipped_already_done": 0}
    try:
        if names:
            counts = build_cache(args.cache, names, load, args.size, meta,
                                 log=lambda line: print(line, file=sys.stderr))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if face_masks is not None:
            face_masks.flush()
    summary = {"cache": os.path.abspath(args.cache), "files": len(files),
               "photos": len(files) - len(not_images), "faces": len(names), **counts,
               "unreadable": sorted(unreadable), "no_face": no_face, "not_images": not_images}
    print(json.dumps(summary))
    return 1 if counts["failed"] or unreadable or no_face or not names else 0


if __name__ == "__main__":
    sys.exit(main())
