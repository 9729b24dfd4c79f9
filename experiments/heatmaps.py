"""Grad-CAM++ heatmaps of VGGFace for a folder of aligned faces (the heatmaps of the mask loss).

    python experiments/heatmaps.py FACES_DIR OUT_DIR --weights WEIGHTS_DIR \
        [--image-size 256] [--batch-size 16] [--recursive]
    python experiments/heatmaps.py CACHE_DIR --weights WEIGHTS_DIR      # into a training cache

For every image FACES_DIR/REL/NAME.EXT this writes OUT_DIR/REL/NAME.npy: an (S, S) float32 array
in [0, 1], ID-Guard's heatmap at the training size S (idguard_jax.networks.gradcam.heatmaps of the image
read as training reads it: PIL bilinear to S x S, [-1, 1]). Read one with np.load(path,
mmap_mode='r').

Resumable: images whose .npy exists are skipped; each file is written under a temporary name and
renamed, so an interrupted run leaves no partial file. OUT_DIR/heatmaps.json records the settings
and a rerun with other settings is refused. The weights are the converted bundle
WEIGHTS_DIR/vggface (python convert/convert.py vggface vggface-9d491dd7c30312.pth WEIGHTS_DIR).
Exit codes: 0 done, 2 refused or failed (one line on stderr says why; finished files stay).
"""
from __future__ import annotations

import argparse
import os
import sys

from idguard_jax import compile_cache, startup

__all__ = ["main", "build_parser"]

_NETWORK = "vggface"


class CliError(Exception):
    """A user error: printed as `heatmaps: ...` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="heatmaps.py", description=__doc__.split("\n\n")[0])
    p.add_argument("faces_dir", metavar="FACES_DIR", help="folder of aligned face images")
    p.add_argument("out_dir", metavar="OUT_DIR", nargs="?",
                   help="folder for the .npy heatmaps (not with a cache: they go into it)")
    p.add_argument("--weights", required=True, metavar="DIR",
                   help=f"folder holding the converted {_NETWORK} bundle")
    p.add_argument("--image-size", type=int, default=256, metavar="S",
                   help="training image size: images are read at S x S, heatmaps are S x S "
                        "(default 256)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B",
                   help="images per Grad-CAM call (default 16)")
    p.add_argument("--recursive", action="store_true", help="also read images in subfolders")
    return p


def _run(args: argparse.Namespace) -> str:
    from idguard_jax.checkpoint import read_meta
    from idguard_jax.data import heatmaps
    from idguard_jax.data.cache import write_heatmaps
    from idguard_jax.image_files import IMAGE_SUFFIXES, list_images
    from idguard_jax.images import to_float
    from idguard_jax.networks import gradcam, identity

    if args.image_size <= 0:
        raise CliError(f"--image-size {args.image_size}: must be positive")
    if args.batch_size <= 0:
        raise CliError(f"--batch-size {args.batch_size}: must be positive")
    try:
        net, variables = identity.load(_NETWORK, args.weights)
        meta = read_meta(os.path.join(args.weights, _NETWORK))

        def compute(images_u8):
            return gradcam.heatmaps(net.module, variables, to_float(images_u8))

        if os.path.isfile(os.path.join(args.faces_dir, "meta.json")):
            # a cache from experiments/prepare.py: its heatmaps go into it, where training reads them
            written, had = write_heatmaps(args.faces_dir, compute, args.batch_size)
            return (f"wrote {written} heatmaps into the cache {args.faces_dir} ({had} were "
                    "already there)")
        if args.out_dir is None:
            raise CliError("OUT_DIR is needed when FACES_DIR is a folder of images")
        paths = list_images(args.faces_dir, recursive=args.recursive)
        if not paths:
            raise CliError(f"{args.faces_dir}: no images ({', '.join(IMAGE_SUFFIXES)})"
                           + ("" if args.recursive else "; --recursive reads subfolders"))
        outputs = heatmaps.output_paths(args.faces_dir, paths, args.out_dir)
        heatmaps.check_settings(args.out_dir, {"image_size": args.image_size, "network": _NETWORK,
                                               "weights_sha256": meta.get("sha256"),
                                               "weights_config": meta.get("config")})
        written, had = heatmaps.write_folder_heatmaps(outputs, compute, args.image_size,
                                                      args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e
    return f"wrote {written} heatmaps to {args.out_dir} ({had} were already there)"


@startup.command
@compile_cache.command
def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors: argparse has already printed the message
        return e.code
    try:
        print(_run(args))
    except (CliError, OSError) as e:  # OSError: an unwritable OUT_DIR, a full disk
        print(f"heatmaps: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
