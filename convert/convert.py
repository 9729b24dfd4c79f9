"""Convert an official PyTorch checkpoint into a bundle the library loads (no torch needed there).

    python convert/convert.py MODEL CHECKPOINT OUT_DIR [--overwrite] [--image-size N] [--prior FILE]
                              [--config FILE] [--eps EPS]

MODEL is a target network (stargan, aggan, fpgan: `200000-G.ckpt`, a plain state_dict; relgan:
`G_15000_sn_wb.pth`, or upstream's {'G': ..., 'D': ...} training file; hisd: `gen_00600000.pt`,
its EMA generator `gen_test`, with the architecture of HiSD's YAML --config, default
celeba-hq_256) or
`generator` (ID-Guard's `AdvG.pth`, with the prior perturbation `optimized_pri_pert.pt` read from
beside it unless --prior names it) or an identity network (plain state_dicts: arcface
`arcface_ir_se50.pth`, irse50 `model_ir_se50.pth`, iresnet50 / iresnet100 `backbone.pth`,
vggface `vggface-9d491dd7c30312.pth`) or `dlib` (`dlib_face_recognition_resnet_model_v1.dat`,
read by idguard_jax.networks.dlib, no dlib or torch) or `prior` (the released prior perturbation
`checkpoint/ID-guard/pri_pert.pt`, clamped to +-EPS as the reference's `advGen.py` does when
loading it; the bundle `experiments/prior.py compute` writes, for `train.py --prior`).
The bundle is written to OUT_DIR/MODEL.
Checkpoints are read with torch's weights_only loader, so a file carrying pickled code is
refused, never run.
Exit codes: 0 done, 2 refused (one line on stderr names the file or option and the problem).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
from typing import Callable

if __package__:
    from convert.torch_io import (ConversionError, checkpoint_entry, load_torch_file,
                                  state_dict_to_numpy, tensor_to_numpy, to_flax)
else:  # `python convert/convert.py`: Python puts convert/ first on sys.path, where this file
    # shadows the installed `convert` package and its sibling is the top-level `torch_io`
    from torch_io import (ConversionError, checkpoint_entry, load_torch_file,
                          state_dict_to_numpy, tensor_to_numpy, to_flax)
from idguard_jax.checkpoint import save_bundle
from idguard_jax.generator import GeneratorConfig, abstract_generator, fit_delta_p, save_generator
from idguard_jax.networks import dlib as dlib_face
from idguard_jax.networks import identity
from idguard_jax.networks import targets
from idguard_jax.networks import hisd as hisd_target
from ports.hisd import config_from_hyperparameters

__all__ = ["main", "convert_target", "convert_generator", "convert_identity", "convert_dlib",
           "convert_prior", "Converter", "TARGETS", "KNOWN_MODELS"]


@dataclasses.dataclass(frozen=True)
class Converter:
    """How one network's official file converts. Its architecture (configuration and abstract
    variables) comes from the library's registry (idguard_jax.networks.targets); this adds what only the
    file format needs: the torch keys to drop (regexes) and how to pick the state_dict out of
    what the file holds (e.g. HiSD's `gen_test` entry)."""
    ignore: tuple[str, ...] = ()
    extract: Callable[[object, str], object] = lambda obj, path: obj
    kind: str = "target"
    # variable collections the library adds at load time (targets.TargetSpec.load_data)
    data_collections: tuple[str, ...] = ()
    # --config FILE: (file, default configuration) -> the configuration; None: no --config
    read_config: Callable[[str, dict], dict] | None = None


# The family's InstanceNorms store running buffers that train-mode IN never reads (the
# reference never calls eval() on them).
_IN_RUNNING_STATS = (r"\.running_(mean|var)$",)


def _relgan_generator(obj: object, path: str) -> object:
    """G's state_dict from a RelGAN file: ID-Guard's `G_15000_sn_wb.pth` is that plain state_dict;
    upstream's GAN.save writes {'G', 'D', 'optimG', 'optimD'}, of which only 'G' is wanted."""
    # Every G key is dotted ('conv_in.0.weight'); the tensors are checked by state_dict_to_numpy.
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and "." in k for k in obj):
        return obj
    return checkpoint_entry(obj, "G", path, "RelGAN's generator state_dict (as "
                            "G_15000_sn_wb.pth) or an upstream training file")


def _hisd_config(path: str, default: dict) -> dict:
    """The target configuration from HiSD's YAML (e.g. configs/celeba-hq_256.yaml): its
    architecture and new_size replace the defaults; the conditions are checked against it."""
    try:
        import yaml  # only --config needs PyYAML (the `convert` extra installs it)
    except ImportError as e:
        raise ConversionError(f"{path}: reading HiSD's YAML config needs PyYAML "
                              "(pip install -e '.[convert]')") from e
    try:
        with open(path) as f:
            config = {**default, **config_from_hyperparameters(yaml.safe_load(f))}
        hisd_target.check_target_config(config)
    except (yaml.YAMLError, ValueError) as e:
        raise ConversionError(f"{path}: {' '.join(str(e).split())}") from e
    return config


TARGETS: dict[str, Converter] = {
    "stargan": Converter(_IN_RUNNING_STATS),
    "aggan": Converter(_IN_RUNNING_STATS),
    "fpgan": Converter(_IN_RUNNING_STATS),
    # eval-mode SwitchNorm reads its running statistics: nothing is dropped
    "relgan": Converter(extract=_relgan_generator),
    # the EMA generator, as every user of the checkpoint loads it
    # (HiSD's `easy_use.py` reads gen_test)
    "hisd": Converter(
        extract=lambda obj, path: checkpoint_entry(obj, "gen_test", path,
                                                   "HiSD's training checkpoint (gen_*.pt)"),
        data_collections=("references",), read_config=_hisd_config),
}
# Identity networks (idguard_jax.networks.identity): plain state_dicts; eval-mode BatchNorm reads its
# running statistics, so nothing is dropped.
TARGETS.update({name: Converter(kind="identity")
                for name in ("arcface", "irse50", "iresnet50", "iresnet100", "vggface")})
GENERATOR = "generator"
DLIB = "dlib"
PRIOR = "prior"
KNOWN_MODELS = tuple(sorted([*TARGETS, GENERATOR, DLIB, PRIOR]))
PRIOR_FILE = "optimized_pri_pert.pt"
DEFAULT_IMAGE_SIZE = 256


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refuse_existing(out: str, overwrite: bool) -> None:
    """Checked before any work, so a refused run leaves an existing bundle untouched."""
    if overwrite or not os.path.exists(out):
        return
    if os.path.isdir(out) and not os.listdir(out):
        return
    raise FileExistsError(f"{out}: already exists; pass --overwrite to replace it")


def convert_target(model: str, checkpoint: str, out_dir: str, overwrite: bool = False,
                   image_size: int = 256, config_file: str | None = None) -> str:
    """Convert a target network's state_dict file to the bundle OUT_DIR/MODEL; returns its path.

    config_file: the network's own configuration file, for converters that read one (--config).
    """
    conv = TARGETS[model]
    out = os.path.join(out_dir, model)
    _refuse_existing(out, overwrite)
    config = dict(targets.TARGETS[model].default_config)
    if config_file is not None:
        config = conv.read_config(config_file, config)
    state_dict = state_dict_to_numpy(conv.extract(load_torch_file(checkpoint), checkpoint),
                                     checkpoint)
    shapes = targets.abstract_variables(model, image_size=image_size, config=config)
    abstract = {collection: tree for collection, tree in shapes.items()
                if collection not in conv.data_collections}
    variables = to_flax(state_dict, abstract, conv.ignore, source=checkpoint)
    meta = {"kind": conv.kind, "model": model, "config": config,
            "source": os.path.basename(checkpoint), "sha256": _sha256(checkpoint)}
    return save_bundle(out, variables, meta, overwrite=overwrite)


def convert_identity(model: str, checkpoint: str, out_dir: str, overwrite: bool = False,
                     config: dict | None = None) -> str:
    """Convert an identity network's state_dict file to the bundle OUT_DIR/MODEL; returns its path.

    config: architecture fields replacing the official ones (e.g. fewer blocks, for tests).
    """
    conv = TARGETS[model]
    out = os.path.join(out_dir, model)
    _refuse_existing(out, overwrite)
    config = {**identity.IDENTITY_NETS[model].default_config, **(config or {})}
    state_dict = state_dict_to_numpy(conv.extract(load_torch_file(checkpoint), checkpoint),
                                     checkpoint)
    variables = to_flax(state_dict, identity.abstract_variables(model, config=config),
                        conv.ignore, source=checkpoint)
    meta = {"kind": conv.kind, "model": model, "config": config,
            "source": os.path.basename(checkpoint), "sha256": _sha256(checkpoint)}
    return save_bundle(out, variables, meta, overwrite=overwrite)


def convert_dlib(checkpoint: str, out_dir: str, overwrite: bool = False) -> str:
    """Convert dlib's face recognition ResNet (.dat) to the bundle OUT_DIR/dlib; returns its
    path. The reader (and its checks) live in idguard_jax.networks.dlib."""
    out = os.path.join(out_dir, DLIB)
    _refuse_existing(out, overwrite)
    try:
        variables = dlib_face.read_dat(checkpoint)
    except dlib_face.DatFormatError as e:
        raise ConversionError(str(e)) from e
    meta = {"kind": "identity", "model": DLIB, "source": os.path.basename(checkpoint),
            "sha256": _sha256(checkpoint)}
    return save_bundle(out, variables, meta, overwrite=overwrite)


def convert_generator(checkpoint: str, out_dir: str, overwrite: bool = False,
                      image_size: int = 256, prior: str | None = None) -> str:
    """Convert an official AdvG.pth (+ its prior perturbation) to OUT_DIR/generator."""
    prior = prior or os.path.join(os.path.dirname(checkpoint), PRIOR_FILE)
    out = os.path.join(out_dir, GENERATOR)
    _refuse_existing(out, overwrite)
    if not os.path.isfile(prior):
        raise ConversionError(f"{prior}: prior perturbation not found (it is read from beside "
                              f"the checkpoint; name another file with --prior FILE)")
    cfg = GeneratorConfig(image_size=image_size)
    abstract = abstract_generator(cfg)
    state_dict = state_dict_to_numpy(load_torch_file(checkpoint), checkpoint)
    variables = to_flax(state_dict, abstract, source=checkpoint)
    try:
        delta_p = fit_delta_p(tensor_to_numpy(load_torch_file(prior), prior), image_size,
                              source=prior)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    extra_meta = {"model": GENERATOR, "source": os.path.basename(checkpoint),
                  "sha256": _sha256(checkpoint), "prior_source": os.path.basename(prior),
                  "prior_sha256": _sha256(prior)}
    return save_generator(out, variables, delta_p, cfg, extra_meta=extra_meta,
                          overwrite=overwrite)


def convert_prior(checkpoint: str, out_dir: str, overwrite: bool = False,
                  image_size: int | None = None, eps: float = GeneratorConfig().eps) -> str:
    """Convert a released prior perturbation (pri_pert.pt, (1, 3, H, W)) to the prior bundle
    OUT_DIR/prior (training.prior.save_prior, as `experiments/prior.py compute` writes);
    returns its path. Values beyond +-eps are clamped (the reference's `advGen.py` does at load)
    and counted in the meta; image_size None keeps the stored size."""
    from idguard_jax.training.prior import prior_from_array, save_prior
    from idguard_jax.training.prior_faces import write_preview

    out = os.path.join(out_dir, PRIOR)
    _refuse_existing(out, overwrite)
    values = tensor_to_numpy(load_torch_file(checkpoint), checkpoint)
    try:
        delta_p, clamped = prior_from_array(values, eps=eps, image_size=image_size,
                                            source=checkpoint)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    meta = {"eps": eps, "source": os.path.basename(checkpoint), "sha256": _sha256(checkpoint),
            "source_shape": list(values.shape), "clamped_values": clamped,
            "note": "released prior perturbation, clamped to +-eps (the reference's advGen.py)"}
    path = save_prior(out, delta_p, meta, overwrite=overwrite)
    write_preview(os.path.join(path, "delta_p.png"), delta_p, eps)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(KNOWN_MODELS)}")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="the official PyTorch file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the bundle goes to OUT_DIR/MODEL")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help=f"image size the network will run at (default {DEFAULT_IMAGE_SIZE}; "
                        "prior: the stored size)")
    p.add_argument("--prior", metavar="FILE",
                   help=f"generator only: the prior perturbation (default: {PRIOR_FILE} beside "
                        "CHECKPOINT)")
    p.add_argument("--config", metavar="FILE",
                   help="hisd only: HiSD's YAML configuration of the checkpoint (default: "
                        "configs/celeba-hq_256.yaml's values)")
    p.add_argument("--eps", type=float, default=None, metavar="EPS",
                   help=f"prior only: clamp to +-EPS in [-1, 1] units (default "
                        f"{GeneratorConfig().eps}, the paper's)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # usage errors: argparse has already printed the message
        return e.code
    problem = None
    if args.model not in KNOWN_MODELS:
        problem = f"unknown MODEL {args.model!r}; known models: {', '.join(KNOWN_MODELS)}"
    elif args.image_size is not None and (args.image_size <= 0 or args.image_size % 4):
        problem = f"--image-size {args.image_size}: must be a positive multiple of 4"
    elif args.prior is not None and args.model != GENERATOR:
        problem = f"--prior applies only to MODEL {GENERATOR!r}"
    elif args.eps is not None and args.model != PRIOR:
        problem = f"--eps applies only to MODEL {PRIOR!r}"
    elif args.eps is not None and not 0 < args.eps < float("inf"):
        problem = f"--eps {args.eps}: must be a positive number"
    elif args.config is not None and (args.model not in TARGETS
                                      or TARGETS[args.model].read_config is None):
        problem = ("--config applies only to MODEL "
                   + ", ".join(repr(m) for m, c in TARGETS.items() if c.read_config))
    if problem:
        print(f"convert: {problem}", file=sys.stderr)
        return 2
    if args.image_size is None and args.model != PRIOR:
        args.image_size = DEFAULT_IMAGE_SIZE
    try:
        if args.model == PRIOR:
            path = convert_prior(args.checkpoint, args.out_dir, args.overwrite, args.image_size,
                                 GeneratorConfig().eps if args.eps is None else args.eps)
        elif args.model == GENERATOR:
            path = convert_generator(args.checkpoint, args.out_dir, args.overwrite,
                                     args.image_size, args.prior)
        elif args.model == DLIB:
            path = convert_dlib(args.checkpoint, args.out_dir, args.overwrite)
        elif TARGETS[args.model].kind == "identity":
            path = convert_identity(args.model, args.checkpoint, args.out_dir, args.overwrite)
        else:
            path = convert_target(args.model, args.checkpoint, args.out_dir, args.overwrite,
                                  args.image_size, args.config)
    except (ConversionError, OSError) as e:  # OSError: an existing bundle, an unwritable OUT_DIR
        print(f"convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    if args.model == PRIOR:
        print(f"train from it with: python experiments/train.py --prior {path} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
