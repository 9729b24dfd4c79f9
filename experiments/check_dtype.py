"""Is `idguard protect --dtype bfloat16` close enough to float32? The grey-level agreement of
the two protections on your photos and aligned faces.

    python experiments/check_dtype.py --photos ../shared/data/faces/photos \
        --aligned ../shared/data/faces/celebahq --generator weights/generator
    python experiments/check_dtype.py --photos ../shared/data/faces/photos \
        --aligned ../shared/data/faces/celebahq --random --output-scale 1 0.3 0.1

Every photo is protected twice by the whole `idguard protect` pipeline (written as PNG, so the
encoding adds nothing): with the float32 generator (the default) and with `--dtype`; aligned faces
(S x S) go straight through the generator. Printed per output scale: the share of perturbation
values at +-eps (the clamp hides any difference there, so the check means something only where
most are not), and the share of colour values and of pixels within 1 grey level of float32, over
everything and over the pixels the protection changes. `--random` uses a random official-size
generator (ngf 64, 6 blocks); `--output-scale` multiplies its last convolution (a random
generator clamps ~2/3 of its values; 0.3 and 0.1 clamp far fewer). The bar for offering a dtype:
>= 99.9% of pixels within 1 grey level. Exit status 0 when it holds, 1 when not, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from idguard_jax import startup

BAR = 0.999


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="check_dtype", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", action="append", default=[], metavar="DIR",
                   help="a folder of ordinary photos (the whole protect pipeline)")
    p.add_argument("--aligned", action="append", default=[], metavar="DIR",
                   help="a folder of aligned faces at the generator's size")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--generator", help="a trained generator folder")
    src.add_argument("--random", action="store_true",
                     help="a random official-size generator (seed 0)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="the dtype checked against float32 (float32: the folded generator)")
    p.add_argument("--output-scale", type=float, nargs="+", default=[1.0],
                   help="factors on the generator's last convolution, one check each")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", help="also write the results to this file")
    return p


def _generator(args):
    import jax
    import jax.numpy as jnp

    from idguard_jax.generator import Generator, GeneratorConfig, init_generator, load_trained

    if args.generator:
        return load_trained(args.generator)
    cfg, variables = init_generator(GeneratorConfig(), jax.random.key(0))
    delta_p = cfg.eps * jax.random.normal(jax.random.key(1), (cfg.image_size, cfg.image_size, 3))
    return Generator(cfg, jax.tree.map(jnp.asarray, variables), delta_p)


def _aligned_faces(folders, size):
    import numpy as np

    from idguard_jax.image_files import list_images, read_rgb

    faces = []
    for folder in folders:
        for path in list_images(folder):
            image = read_rgb(path)
            if image.shape[:2] != (size, size):
                raise ValueError(f"{path}: {image.shape[1]}x{image.shape[0]}, not an aligned "
                                 f"{size}x{size} face (--photos takes ordinary photos)")
            faces.append(image)
    return np.stack(faces) if faces else np.zeros((0, size, size, 3), np.uint8)


def _photo_faces(jobs, size):
    """The aligned faces the pipeline protects in the photos (for the clamped share)."""
    import numpy as np

    from idguard_jax.faces import align
    from idguard_jax.faces.detection import FaceAnalyzer
    from idguard_jax.protection.photo_io import read_photo

    analyzer, faces = FaceAnalyzer(), []
    for source, _ in jobs:
        for frame in read_photo(source).upright_frames():
            faces += [f.image for f in align.analyse_image(frame, analyzer, size)
                      if f.status == align.OK]
    return np.stack(faces) if faces else np.zeros((0, size, size, 3), np.uint8)


def _photo_agreement(ref_gen, test_gen, jobs, batch_size):
    """Both protections of every photo through photos.protect_photos (PNG), compared."""
    import numpy as np
    from PIL import Image

    from idguard_jax.protection import photos, precision
    from idguard_jax.protection.photo_io import read_photo

    options = photos.PhotoOptions(output_format="PNG", batch_size=batch_size)
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for name, gen in (("ref", ref_gen), ("test", test_gen)):
            mine = [(s, os.path.join(tmp, name, os.path.basename(o))) for s, o in jobs]
            outcomes = photos.protect_photos(gen, mine, options)
            outs[name] = [o.output if o.status == photos.PROTECTED else None for o in outcomes]
        for (source, _), ref, test in zip(jobs, outs["ref"], outs["test"]):
            if ref is None or test is None:
                continue
            original = read_photo(source).stored
            a, b = (np.asarray(Image.open(p)) for p in (ref, test))
            parts.append(precision.grey_level_agreement(a, b, original))
    return parts


def _check(args, base, scale, jobs, aligned, photo_faces) -> dict:
    import numpy as np

    from idguard_jax.protection import fast, faces, precision

    ref = precision.with_output_scale(base, scale) if scale != 1.0 else base
    test = fast.prepare(ref, args.dtype)
    folded = fast.prepare(ref, "float32")
    everything = list(aligned) + list(photo_faces)
    clamped = precision.clamped_share(folded, np.stack(everything)) if everything else None
    result = {"output_scale": scale, "clamped_share": clamped}
    if len(aligned):
        a = faces.protect(ref, aligned, max_bucket=args.batch_size)
        b = faces.protect(test, aligned, max_bucket=args.batch_size)
        result["aligned"] = precision.merge_agreement(
            [precision.grey_level_agreement(a, b, aligned)])
    if jobs:
        result["photos"] = precision.merge_agreement(_photo_agreement(ref, test, jobs,
                                                                      args.batch_size))
    return result


def _print(result, stream) -> None:
    clamped = result["clamped_share"]
    print(f"output scale {result['output_scale']:g}: "
          + (f"{clamped:.1%} of perturbation values at +-eps" if clamped is not None else ""),
          file=stream)
    for kind in ("aligned", "photos"):
        if kind in result:
            r = result[kind]
            print(f"  {kind:8s} pixels within 1 grey level: {r['share_pixels_within_1']:.5%} "
                  f"(changed pixels {r['share_changed_pixels_within_1']:.5%}); values within 1: "
                  f"{r['share_values_within_1']:.5%}; values equal: {r['share_values_equal']:.3%}"
                  f" (of changed pixels {r['share_changed_values_equal']:.3%}); largest "
                  f"difference {r['max_diff']}; {r['pixels']} pixels, {r['changed_pixels']} "
                  f"changed", file=stream)


@startup.command
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not args.photos and not args.aligned:
        print("check_dtype: give --photos DIR and/or --aligned DIR", file=sys.stderr)
        return 2
    from idguard_jax.image_files import list_images
    from idguard_jax.protection.photo_io import PHOTO_SUFFIXES

    try:
        base = _generator(args)
        size = base.config.image_size
        aligned = _aligned_faces(args.aligned, size)
        jobs = [(p, p) for d in args.photos for p in list_images(d, suffixes=PHOTO_SUFFIXES)]
    except (ValueError, OSError) as e:
        print(f"check_dtype: {e}", file=sys.stderr)
        return 2
    photo_faces = _photo_faces(jobs, size) if jobs else aligned[:0]
    print(f"{args.dtype} against float32: {len(aligned)} aligned face(s), {len(jobs)} photo(s) "
          f"with {len(photo_faces)} face(s); generator "
          f"{args.generator or 'random (official size, seed 0)'}", file=sys.stdout)
    results = []
    for scale in args.output_scale:
        results.append(_check(args, base, scale, jobs, aligned, photo_faces))
        _print(results[-1], sys.stdout)
    ok = all(r[k]["share_pixels_within_1"] >= BAR for r in results for k in ("aligned", "photos")
             if k in r)
    print(f"{'PASS' if ok else 'FAIL'}: >= {BAR:.1%} of pixels within 1 grey level "
          f"{'everywhere' if ok else 'not reached somewhere'}", file=sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "generator": args.generator or "random",
                       "results": results}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
