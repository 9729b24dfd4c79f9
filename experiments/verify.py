"""See the protection work: what each manipulation model makes of the original and the protected
photo.

    idguard verify photo.jpg protected/photo.jpg --weights weights/ --out check.png
    idguard verify photo.jpg protected/photo.jpg --random-targets      # machinery demo only

The faces are found on the ORIGINAL and both photos are aligned with the same transform, so the
two crops differ only by the protection. Every converted target in --weights (or --targets)
manipulates both under each of its conditions; printed per target and condition: L2_face
between the two manipulated faces (paper eq. 13, > 0.05 is a success), their identity
similarity (ArcFace cosine < 0.4 when --weights holds a converted ArcFace, else dlib's descriptor
distance >= 0.6) and whether the defence succeeded. The PNG grid shows, per target and
condition: original, manipulated original, protected, manipulated protected. Exit status 0 when
measured (whatever the outcome), 2 for bad arguments or no face in the original.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idguard_jax.networks.targets import TARGETS  # noqa: E402  (after the path set-up above

ALL_TARGETS = tuple(TARGETS)



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idguard verify", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("original")
    p.add_argument("protected")
    p.add_argument("--weights", help="folder of converted targets (convert/convert.py)")
    p.add_argument("--targets", help="comma-separated target names (default: every target "
                                     "converted in --weights)")
    p.add_argument("--identity", default="auto",
                   help="identity judge: auto (a converted ArcFace in --weights, else dlib), "
                        "arcface, irse50, iresnet50, iresnet100, dlib")
    p.add_argument("--random-targets", choices=("tiny", "demo"), default=None,
                   help="RANDOM small targets at 64 px instead of converted ones: shows the "
                        "machinery, says nothing about real protection")
    p.add_argument("--all-faces", action="store_true", help="every face, not only the largest")
    p.add_argument("--out", help="write the grid PNG here")
    p.add_argument("--json", help="write every number as JSON here")
    return p


def _fail(message: str) -> int:
    print(f"idguard verify: {message}", file=sys.stderr)
    return 2


def _available(weights: str) -> list[str]:
    return [n for n in ALL_TARGETS if os.path.isdir(os.path.join(weights, n))]


def main(argv=None) -> int:
    args = parser().parse_intermixed_args(argv)
    if not args.weights and not args.random_targets:
        return _fail("give --weights (converted targets) or --random-targets (a demo)")
    if args.weights and not os.path.isdir(args.weights):
        return _fail(f"--weights {args.weights}: no such folder")
    names = args.targets.split(",") if args.targets else (
        _available(args.weights) if args.weights else list(ALL_TARGETS))
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown:
        return _fail(f"--targets: unknown {', '.join(unknown)} (known: {', '.join(ALL_TARGETS)})")
    if not names:
        return _fail(f"--weights {args.weights}: no converted target found "
                     f"(expected sub-folders named {', '.join(ALL_TARGETS)})")
    from idguard_jax.faces import align
    from idguard_jax.evaluation import measure as evaluation
    from idguard_jax.evaluation import report
    from idguard_jax.faces.detection import FaceAnalyzer
    from idguard_jax.protection.photo_io import read_photo

    try:
        original, protected = read_photo(args.original), read_photo(args.protected)
    except ValueError as e:
        return _fail(str(e))
    if original.upright.shape != protected.upright.shape:
        return _fail(f"{args.protected}: {protected.upright.shape[1]}x"
                     f"{protected.upright.shape[0]} px, but {args.original} is "
                     f"{original.upright.shape[1]}x{original.upright.shape[0]}: not the same photo")
    try:
        models = evaluation.load_models(names, None if args.random_targets else args.weights,
                                        image_size=64, size=args.random_targets or "tiny")
        judge = evaluation.make_judge(args.identity, args.weights)
    except (ValueError, OSError, FileNotFoundError) as e:
        return _fail(str(e))
    size = 64 if args.random_targets else 256   # the frame the official targets were trained at
    analyzer = FaceAnalyzer()
    faces = align.analyse_image(original.upright, analyzer, size, min_face=1)
    if not faces:
        return _fail(f"{args.original}: no face found")
    faces = faces if args.all_faces else faces[:1]
    clean = np.stack([f.image for f in faces])
    prot = np.stack([align.cut_aligned(protected.upright, f.transform, size) for f in faces])
    m = evaluation.measure(models, clean, prot, judge,
                           input_face_masks=np.stack([f.face_mask for f in faces]))
    if models.random:
        print("NOTE: the targets are RANDOM stand-ins (--random-targets): these numbers show the "
              "machinery, not whether the protection works on real models.")
    print(f"identity judge: {m['judge']}")
    print("visible cost on the aligned face(s): PSNR "
          + ", ".join(f"{v:.1f}" for v in m["psnr"]) + " dB, SSIM "
          + ", ".join(f"{v:.3f}" for v in m["ssim"]))
    id_col = "ID sim" if m["criterion"] == "cosine" else "ID distance"
    print(f"\n{'target':<8} {'cond':>4} {'face':>4} {'L2_face':>8} {id_col:>11} {'success':>8}")
    wins = total = 0
    rows, columns = [], [[], [], [], []]
    for name, r in m["targets"].items():
        ident = r["id_sim"] if m["criterion"] == "cosine" else r["id_distance"]
        for k in range(r["l2_face"].shape[0]):
            for i in range(r["l2_face"].shape[1]):
                ok = bool(r["dsr"][k, i])
                wins, total = wins + ok, total + 1
                print(f"{name:<8} {k:>4} {i:>4} {r['l2_face'][k, i]:>8.4f} {ident[k, i]:>11.3f} "
                      f"{'yes' if ok else 'no':>8}")
                rows.append({"target": name, "condition": k, "face": i,
                             "l2_face": float(r["l2_face"][k, i]), "identity": float(ident[k, i]),
                             "success": ok})
                for col, img in zip(columns, (clean[i], r["manipulated_clean"][k, i], prot[i],
                                              r["manipulated_protected"][k, i])):
                    col.append(evaluation.as_float(img[None])[0])
    print(f"\nthe defence succeeds on {wins} of {total} manipulations "
          f"(L2_face > 0.05 and identity destroyed: {m['judge']})")
    if args.out:
        report.write_grid(args.out, [np.stack(c) for c in columns])
        print(f"grid (original | manipulated | protected | manipulated protected): {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"judge": m["judge"], "random_targets": models.random,
                       "psnr": [float(v) for v in m["psnr"]],
                       "ssim": [float(v) for v in m["ssim"]], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
