"""Protect your own photos against face manipulation.

    idguard protect photo.jpg holiday/ --out protected/ --generator weights/generator
    python experiments/protect.py holiday/ --recursive --out protected/ --generator runs/demo-kpi/generator

Every face in every photo is detected (dlib), aligned to the generator's frame, protected in
batches across photos, and the perturbation is warped back and added at full resolution within
the eps budget (0.05 in [-1, 1] units = at most 6 grey levels per channel). Outputs keep the
input's name, format, size, orientation, frames and metadata (JPEG and AVIF: 4:4:4 chroma,
quality chosen per photo to keep the perturbation and reported; HEIC, TIFF, PNG, WebP, BMP:
lossless); a GIF is written as PNG (APNG when animated) unless --keep-gif, as its 256-colour
palette cannot carry the perturbation. Files of an input folder that are not photos are listed,
never silently skipped. Inputs are never modified; existing outputs are
never replaced without --overwrite; --resume skips photos already done. One bad photo never
stops the rest. Exit status: 0 all protected (photos without a face are counted, not errors),
1 some photo failed, 2 bad arguments (nothing written), 130 interrupted (rerun with --resume).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from idguard_jax import compile_cache, startup


# --format choices -> PIL format names (None: each photo's own)
FORMATS = {"same": None, "png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP",
           "tiff": "TIFF", "heic": "HEIF", "avif": "AVIF", "gif": "GIF"}


class UsageError(Exception):
    """Bad arguments: reported in one line, exit status 2, nothing written."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idguard protect", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="photo files or folders")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--generator", required=True,
                   help="a trained generator folder (train.py's WORKDIR/generator, or "
                        "convert.py generator's output)")
    p.add_argument("--recursive", action="store_true", help="also photos in sub-folders")
    p.add_argument("--eps", type=float, default=None,
                   help="L-inf budget in [-1, 1] units (default: the generator's, 0.05 = 6 grey "
                        "levels); higher protects more and shows more")
    p.add_argument("--format", choices=sorted(FORMATS), default="same",
                   help="write every photo in this format (the name's suffix follows) instead "
                        "of its own ('same', the default; a GIF becomes PNG unless --keep-gif)")
    p.add_argument("--png", action="store_true", help="the same as --format png (lossless)")
    p.add_argument("--keep-gif", action="store_true",
                   help="write GIFs as GIF: their 256-colour palette keeps little of the "
                        "perturbation (the share kept is reported)")
    p.add_argument("--quality", "--jpeg-quality", dest="jpeg_quality", default="auto",
                   metavar="Q",
                   help="JPEG and AVIF quality 1-100, or 'auto' (default): the lowest of "
                        "95/98/100 that keeps >= 90%% of the perturbation's energy")
    p.add_argument("--strip-metadata", action="store_true",
                   help="drop EXIF (incl. GPS), XMP and comments; the picture is stored upright")
    p.add_argument("--no-face", choices=("skip", "copy"), default="skip",
                   help="photos without a usable face: skip them (default) or copy them unchanged")
    p.add_argument("--min-face", type=int, default=64,
                   help="faces narrower than this (px) are reported and left unprotected")
    p.add_argument("--batch-size", type=int, default=None,
                   help="faces per generator call (default 32 on a GPU/TPU, 4 on a CPU, where "
                        "larger batches are no faster)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding and detecting")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the generator's arithmetic, BatchNorm folded into its convolutions "
                        "either way: float32 (default; the trained network's numbers to float32 "
                        "rounding, its residual blocks by Winograd on a CPU) or bfloat16 "
                        "(bfloat16 matrix products with float32 sums: faster on CPUs with "
                        "bfloat16 dot instructions; on the shared photos >= 99.9%% of pixels "
                        "within 1 grey level of float32, see experiments/check_dtype.py)")
    p.add_argument("--profile", action="store_true",
                   help="also print where the time went: seconds per stage (reading, detection, "
                        "landmarks, alignment, protection, warp-back, encoding, writing) and "
                        "photos/s; changes no output")
    p.add_argument("--resume", action="store_true", help="skip photos whose output exists")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--report", help="also write every photo's outcome as JSON to this file")
    return p


def _check_writer(fmt: str) -> None:
    from PIL import features

    from idguard_jax.image_files import HEIF_READABLE

    if fmt == "HEIF" and not HEIF_READABLE:
        raise UsageError("--format heic needs pillow-heif: pip install pillow-heif")
    if fmt == "AVIF" and not features.check("avif"):
        raise UsageError("--format avif: this Pillow has no AVIF support")


def _check_args(args) -> None:
    if args.eps is not None and not 0 < args.eps <= 1:
        raise UsageError(f"--eps {args.eps}: must be in (0, 1] ([-1, 1] units; 0.05 is the paper's)")
    if args.png and args.format not in ("same", "png"):
        raise UsageError(f"--png and --format {args.format} contradict each other: choose one")
    args.output_format = "PNG" if args.png else FORMATS[args.format]
    _check_writer(args.output_format or "")
    if args.jpeg_quality != "auto":
        try:
            q = int(args.jpeg_quality)
        except ValueError:
            q = 0
        if not 1 <= q <= 100:
            raise UsageError(f"--quality/--jpeg-quality {args.jpeg_quality}: must be 1-100 "
                             f"or 'auto'")
        args.jpeg_quality = q
    if args.batch_size is None:
        import jax

        args.batch_size = 4 if jax.default_backend() == "cpu" else 32
    if args.batch_size < 1 or args.workers < 1 or args.min_face < 1:
        raise UsageError("--batch-size, --workers and --min-face must be positive")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: choose one")


def _summary(outcomes, skipped, not_photos, seconds, stream) -> None:
    from idguard_jax.protection import photos

    by = {s: [o for o in outcomes if o.status == s]
          for s in (photos.PROTECTED, photos.NO_FACE, photos.COPIED, photos.FAILED)}
    faces = sum(o.faces for o in by[photos.PROTECTED])
    done = len(outcomes)
    print(f"\n{done} photo(s) in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} images/s): "
          f"{len(by[photos.PROTECTED])} protected ({faces} faces), "
          f"{len(by[photos.NO_FACE]) + len(by[photos.COPIED])} without a usable face, "
          f"{len(by[photos.FAILED])} failed" + (f", {len(skipped)} already done (--resume)"
                                                if skipped else "")
          + (f", {sum(map(len, not_photos.values()))} file(s) not a photo" if not_photos
             else ""), file=stream)
    _visible_cost_line(by[photos.PROTECTED], stream)
    _conversions(outcomes, stream)
    for title, group in (("without a usable face (skipped)", by[photos.NO_FACE]),
                         ("without a usable face (copied unchanged)", by[photos.COPIED])):
        if group:
            print(f"{title}: " + ", ".join(o.source for o in group), file=stream)
    small = [o for o in outcomes if o.too_small]
    if small:
        print("faces too small to protect (left unchanged): " + ", ".join(
            f"{o.source} ({o.too_small})" for o in small), file=stream)
    for suffix, paths in not_photos.items():
        print(f"not a photo: {suffix} ({len(paths)}, left as they are): "
              + ", ".join(paths[:5]) + (", ..." if len(paths) > 5 else ""), file=stream)
    for o in by[photos.FAILED]:
        print(f"FAILED {o.error}", file=stream)


def _visible_cost_line(protected, stream) -> None:
    psnr = [o.psnr for o in protected if o.psnr is not None]
    ssim = [o.ssim for o in protected if o.ssim is not None]
    kept = [o.kept for o in protected if o.kept is not None]
    if not psnr:
        return
    quals = {}
    for o in protected:
        if o.written.get("quality"):
            quals.setdefault(o.written["format"], set()).add(o.written["quality"])
    said = "; ".join(f"{fmt} quality {', '.join(map(str, sorted(q)))}"
                     for fmt, q in sorted(quals.items()))
    print(f"visible cost inside the changed area: PSNR {min(psnr):.1f}-{max(psnr):.1f} dB"
          + (f", SSIM {min(ssim):.3f}-{max(ssim):.3f}" if ssim else "")
          + f"; the written files keep {min(kept):.0%}-{max(kept):.0%} of the "
          f"perturbation's energy" + (f" ({said}, 4:4:4 chroma)" if said else ""), file=stream)


def _conversions(outcomes, stream) -> None:
    """Photos written in another format than their own, e.g. 'GIF -> PNG', and why."""
    groups: dict[str, list] = {}
    for o in outcomes:
        if o.written and o.written.get("converted"):
            groups.setdefault(o.written["converted"], []).append(o)
    for change, group in sorted(groups.items()):
        why = (" (a GIF's 256-colour palette cannot carry the perturbation; --keep-gif keeps "
               "GIF)" if change.startswith("GIF -> ") else "")
        print(f"written as {change.split(' -> ')[1]} instead of {change.split(' -> ')[0]}{why}: "
              + ", ".join(f"{o.source} -> {o.output}" for o in group), file=stream)
    gifs = [o for o in outcomes if o.written and o.written.get("format") == "GIF"]
    if gifs:
        print("written as GIF (--keep-gif): its palette keeps "
              f"{min(o.kept or 0 for o in gifs):.0%}-{max(o.kept or 0 for o in gifs):.0%} "
              "of the perturbation's energy", file=stream)


def _plan(args) -> list[tuple[str, str]]:
    """The (source, output) pairs, after every check that needs no generator."""
    from idguard_jax.protection import jobs as jobs_lib

    try:
        jobs = jobs_lib.plan_jobs(args.inputs, args.out, recursive=args.recursive,
                                  output_format=args.output_format, keep_gif=args.keep_gif)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if not jobs:
        raise UsageError("no photos found in " + " ".join(args.inputs)
                         + ("" if args.recursive else " (sub-folders need --recursive)"))
    existing = [o for _, o in jobs if os.path.exists(o)]
    if existing and not (args.resume or args.overwrite):
        raise UsageError(f"{len(existing)} output(s) exist already, e.g. {existing[0]}; "
                         f"--resume skips them, --overwrite replaces them")
    if args.report and os.path.exists(args.report) and not args.overwrite:
        raise UsageError(f"--report {args.report}: exists already (--overwrite replaces it)")
    try:
        jobs_lib.check_writable(args.out)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return jobs


def _load_generator(path: str, dtype: str = "float32"):
    """The generator with its BatchNorm folded, in `dtype` (protection/fast.py): 1.6x faster
    than the module in float32 on a 2-core CPU, the same pixels to float32 rounding."""
    from idguard_jax.protection import faces as protect

    try:
        return protect.load(path, dtype=dtype)
    except Exception as e:
        raise UsageError(f"--generator {path}: cannot load a generator ({e})") from e


def _protect(args, gen, todo, timer=None) -> tuple[list, float, int]:
    """Protect `todo` with a progress bar: (outcomes, seconds, 0 or 130 if interrupted);
    `timer` (profile.StageTimer) collects the seconds per stage."""
    from tqdm import tqdm

    from idguard_jax.protection import photos

    options = photos.PhotoOptions(
        eps=args.eps, min_face=args.min_face, no_face=args.no_face,
        output_format=args.output_format, keep_gif=args.keep_gif,
        jpeg_quality=args.jpeg_quality,
        strip_metadata=args.strip_metadata, batch_size=args.batch_size, workers=args.workers)
    bar = tqdm(total=len(todo), desc="protect", unit="img", disable=None)  # tty only
    outcomes = []

    def on_result(o):
        outcomes.append(o)
        bar.update(1)

    t0 = time.perf_counter()
    status = 0
    try:
        photos.protect_photos(gen, todo, options, on_result=on_result, timer=timer)
    except KeyboardInterrupt:
        status = 130
    finally:
        bar.close()
    return outcomes, time.perf_counter() - t0, status


@startup.command
@compile_cache.command
def main(argv=None) -> int:
    args = parser().parse_intermixed_args(argv)
    try:
        _check_args(args)
        jobs = _plan(args)
        gen = _load_generator(args.generator, args.dtype)
    except UsageError as e:
        print(f"idguard protect: {e}", file=sys.stderr)
        return 2
    from idguard_jax.images import eps_grey_levels
    from idguard_jax.protection import photos
    from idguard_jax.protection.jobs import not_photos, remove_stale_temporaries
    from idguard_jax.protection.profile import StageTimer

    remove_stale_temporaries(jobs)
    skipped = [s for s, o in jobs if args.resume and os.path.exists(o)]
    todo = [(s, o) for s, o in jobs if not (args.resume and os.path.exists(o))]
    eps = gen.config.eps if args.eps is None else args.eps
    print(f"protecting {len(todo)} photo(s) with eps {eps:g} ([-1, 1] units; at most "
          f"{eps_grey_levels(eps)} grey levels per channel), generator {args.generator}"
          + (f", {args.dtype}" if args.dtype != "float32" else "")
          + (f"; {len(skipped)} already done" if skipped else ""), file=sys.stderr)
    timer = StageTimer() if args.profile else None
    with timer.compiles() if timer else contextlib.nullcontext():
        outcomes, seconds, status = _protect(args, gen, todo, timer)
    others = not_photos(args.inputs, recursive=args.recursive)
    _summary(outcomes, skipped, others, seconds, sys.stdout)
    if timer is not None:
        print(f"\nprofile ({args.workers} worker thread(s), batches of {args.batch_size} faces, "
              f"{args.dtype}):\n"
              + timer.table(len(outcomes), seconds), file=sys.stdout)
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"eps": eps, "generator": args.generator, "seconds": seconds,
                       "skipped": skipped, "photos": [o.as_dict() for o in outcomes],
                       "not_photos": {f"not a photo: {k}": {"count": len(v), "files": v}
                                      for k, v in others.items()}}, f, indent=1)
    if status == 130:
        print(f"interrupted after {len(outcomes)} of {len(todo)} photo(s): what is written is "
              f"complete; rerun with --resume to do the rest", file=sys.stderr)
        return status
    return 1 if any(o.status == photos.FAILED for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
