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

from idguard_jax import compile_cache, startup
from idguard_jax.networks.targets import PAPER_TARGETS, TARGETS

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


def _target_names(args) -> list[str]:
    """--targets, else every target converted in --weights, else (random) the paper's five."""
    if args.targets:
        return args.targets.split(",")
    return _available(args.weights) if args.weights else list(PAPER_TARGETS)


def _check_args(args) -> str | None:
    """What is wrong with the arguments (None: nothing)."""
    if not args.weights and not args.random_targets:
        return "give --weights (converted targets) or --random-targets (a demo)"
    if args.weights and not os.path.isdir(args.weights):
        return f"--weights {args.weights}: no such folder"
    names = _target_names(args)
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown:
        return f"--targets: unknown {', '.join(unknown)} (known: {', '.join(ALL_TARGETS)})"
    if not names:
        return (f"--weights {args.weights}: no converted target found "
                f"(expected sub-folders named {', '.join(ALL_TARGETS)})")
    return None


def _print_table(m: dict, rows: list[dict], random_targets: bool) -> None:
    if random_targets:
        print("NOTE: the targets are RANDOM stand-ins (--random-targets): these numbers show the "
              "machinery, not whether the protection works on real models.")
    print(f"identity judge: {m['judge']}")
    print("visible cost on the aligned face(s): PSNR "
          + ", ".join(f"{v:.1f}" for v in m["psnr"]) + " dB, SSIM "
          + ", ".join(f"{v:.3f}" for v in m["ssim"]))
    id_col = "ID sim" if m["criterion"] == "cosine" else "ID distance"
    print(f"\n{'target':<8} {'cond':>4} {'face':>4} {'L2_face':>8} {id_col:>11} {'success':>8}")
    for r in rows:
        print(f"{r['target']:<8} {r['condition']:>4} {r['face']:>4} {r['l2_face']:>8.4f} "
              f"{r['identity']:>11.3f} {'yes' if r['success'] else 'no':>8}")
    wins = sum(r["success"] for r in rows)
    print(f"\nthe defence succeeds on {wins} of {len(rows)} manipulations "
          f"(L2_face > 0.05 and identity destroyed: {m['judge']})")


@startup.command
@compile_cache.command
def main(argv=None) -> int:
    args = parser().parse_intermixed_args(argv)
    problem = _check_args(args)
    if problem:
        return _fail(problem)
    from idguard_jax.evaluation import judge as judge_lib
    from idguard_jax.evaluation import measure
    from idguard_jax.evaluation import photo_pair
    from idguard_jax.evaluation import report

    try:
        original, protected = photo_pair.read_pair(args.original, args.protected)
        models = measure.load_models(_target_names(args),
                                        None if args.random_targets else args.weights,
                                        image_size=64, size=args.random_targets or "tiny")
        judge = judge_lib.make_judge(args.identity, args.weights)
    except (ValueError, OSError, FileNotFoundError) as e:
        return _fail(str(e))
    size = 64 if args.random_targets else 256   # the frame the official targets were trained at
    pair = photo_pair.align_pair(original, protected, size, all_faces=args.all_faces)
    if pair is None:
        return _fail(f"{args.original}: no face found")
    m = measure.measure(models, pair.clean, pair.protected, judge,
                           input_face_masks=pair.face_masks)
    rows = photo_pair.manipulation_rows(m)
    _print_table(m, rows, models.random)
    if args.out:
        report.write_grid(args.out, photo_pair.grid_columns(m, pair))
        print(f"grid (original | manipulated | protected | manipulated protected): {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"judge": m["judge"], "random_targets": models.random,
                       "psnr": [float(v) for v in m["psnr"]],
                       "ssim": [float(v) for v in m["ssim"]], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
