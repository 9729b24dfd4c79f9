"""Does a protection work? Per-image measurements of the paper's metrics (IV-A4).

    models = evaluation.load_models(["stargan", "hisd"], "weights/", image_size=256)
    judge = evaluation.make_judge("auto", "weights/")        # ArcFace if converted, else dlib
    m = evaluation.measure(models, clean, protected, judge)  # one image pair or a batch
    evaluation.summarise(m)["targets"]["stargan"]["dsr"]

For every target and condition, the clean image x and the protected image x' are manipulated
(y = G(x, c), y' = G(x', c)), and per image:
- `l2_face`: eq. 13 on [-1, 1] images inside the whole-face mask of y (dlib's 68 landmarks on y,
  `align.face_mask_from_landmarks`); where dlib finds no face on y, the clean input's face mask
  (given, or found on x); where none is found there either, the mask of the aligned-face template
  (`align.ALIGNED_TEMPLATE_68`). `mask_source` records which, per output.
- `id_sim`: cosine similarity of the judge's embeddings of y and y'. With the dlib network also
  `id_distance` (descriptor distance); identity is destroyed when cosine < 0.4 (ArcFace, the
  paper) or distance >= 0.6 (dlib's threshold): `Judge.describe()` says which, and with which
  input normalisation (`make_judge(normalisation=)`, default 'reference': what ID-Guard's code
  feeds ArcFace, [-1, 1] resized to 112 without a crop).
- `dsr`: L2_face > 0.05 AND identity destroyed (the paper's success event).
- `mse` / `mse_success` (Disrupting Deepfakes: unmasked MSE > 0.05) and `cmua_l2` /
  `cmua_success` (CMUA-Watermark's changed-pixel mask, targets.md 6a).
- `misdirected`: dlib's recogniser does not match y' to the person: no face found on y', or its
  descriptor is >= 0.6 from the CLEAN PHOTO's (NaN where dlib finds no face on the photo).
Per image also the visible cost: `psnr`, `ssim` (protected vs original) and `linf`.

dlib's descriptors are cut from dlib's 150 px face chip at landmarks: y and y' at the landmarks
of y (or the mask's fallback), as the identity loss does; y' for misdirection at its own.
Host-side dlib work (detection, landmarks) runs per output; the targets and identity networks
run jitted in chunks of `CHUNK` images, the last one padded, so each network compiles once per
image size whatever the batch size (a short last batch included).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idguard_jax.faces import align
from idguard_jax.evaluation import metrics
from idguard_jax.networks import identity as identity_lib
from idguard_jax.networks import targets as targets_lib
from idguard_jax.networks.dlib_chips import chip_warps
from idguard_jax.images import to_float, to_uint8

__all__ = ["Models", "load_models", "Judge", "make_judge", "FaceFinder", "template_landmarks",
           "measure", "concatenate", "summarise", "MASK_SOURCES", "CHUNK", "as_float",
           "quantise_within", "to_jsonable"]

CHUNK = 8
MASK_SOURCES = ("output", "input", "template")
# dlib 5-point landmark order as 68-point indices: outer and inner corner of the image-right
# eye, outer and inner corner of the image-left eye, the bottom of the nose (checked against
# dlib's 5-point model on the shared faces: within 2 px).
_FIVE_FROM_68 = (45, 42, 36, 39, 33)


# ------------------------------------------------------------------------------------------
# What is attacked, and who judges identity
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Models:
    """Manipulation networks under evaluation: Targets and their weights (by target name).
    `random` marks randomly initialised stand-ins (they show the machinery, not the paper)."""
    targets: tuple[targets_lib.Target, ...]
    variables: dict = dataclasses.field(compare=False, hash=False)
    random: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.targets)


def load_models(names: Sequence[str], weights_dir: str | os.PathLike | None = None, *,
                image_size: int = 256, size: str = "tiny", seed: int = 0) -> Models:
    """Converted targets from `weights_dir` (convert/convert.py), or without it RANDOM ones of
    architecture `size` ('tiny', 'demo', 'official') at `image_size`."""
    if not names:
        raise ValueError("name at least one target")
    if weights_dir is not None:
        loaded = [targets_lib.load(n, weights_dir) for n in names]
        return Models(tuple(t for t, _ in loaded), {t.name: v for t, v in loaded})
    keys = jax.random.split(jax.random.key(seed), len(names))
    made = [targets_lib.init_random(n, k, image_size, targets_lib.size_config(n, size))
            for n, k in zip(names, keys)]
    return Models(tuple(t for t, _ in made), {t.name: v for t, v in made}, random=True)


@dataclasses.dataclass(frozen=True)
class Judge:
    """The identity network that decides "identity destroyed".

    criterion 'cosine': embeddings' cosine < threshold (ArcFace, the paper: 0.4);
    'distance': dlib descriptors' Euclidean distance >= threshold (0.6)."""
    net: identity_lib.IdentityNet
    variables: Any = dataclasses.field(compare=False, hash=False)
    criterion: str = "cosine"
    threshold: float = metrics.ID_SIM_SUCCESS
    random: bool = False

    @property
    def name(self) -> str:
        return self.net.name

    @property
    def normalisation(self) -> str:
        return self.net.normalisation

    def describe(self) -> str:
        what = (f"{self.name} cosine < {self.threshold:g}" if self.criterion == "cosine"
                else f"{self.name} descriptor distance >= {self.threshold:g}")
        # how the network sees the outputs changes its similarities: say which input it got
        what += (" (on dlib's 150 px face chips)" if self.net.chip_based
                 else f" ({self.normalisation!r} input normalisation)")
        return what + (" (RANDOM stand-in network: recognises nobody)" if self.random else "")


def make_judge(name: str = "auto", weights_dir: str | os.PathLike | None = None,
               seed: int = 0, normalisation: str = "reference", **config) -> Judge:
    """'auto': a converted ArcFace in weights_dir (the paper's judge), else dlib's offline
    network. Also any identity network name; 'standin' is random (tests only).

    normalisation (`identity.NORMALISATIONS`): how the outputs are fed to the network.
    'reference' (default) is what ID-Guard's code feeds ArcFace ([-1, 1], resized to 112, no
    crop), so the numbers compare with the paper's code; 'trained' is what the network was
    trained on (ArcFace: ImageNet mean/std). dlib's chips ignore it."""
    if normalisation not in identity_lib.NORMALISATIONS:
        raise ValueError(f"identity normalisation {normalisation!r}: choose one of "
                         f"{', '.join(identity_lib.NORMALISATIONS)}")
    if name == "auto":
        name = identity_lib.default_loss_network(weights_dir)
    if name == "standin":
        net, variables = identity_lib.init_random(name, jax.random.key(seed),
                                                  normalisation=normalisation, **config)
        return Judge(net, variables, random=True)
    if name == "dlib":
        net, variables = identity_lib.load("dlib", weights_dir or "", normalisation)
        return Judge(net, variables, "distance", metrics.DLIB_SAME_PERSON)
    if weights_dir is None:
        raise ValueError(f"identity judge {name!r} needs --weights with its converted bundle")
    net, variables = identity_lib.load(name, weights_dir, normalisation)
    return Judge(net, variables)


def template_landmarks(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The aligned-face template's (68, 2) and dlib-5-point (5, 2) landmarks in pixels."""
    pts68 = align.ALIGNED_TEMPLATE_68 * size
    return pts68, pts68[list(_FIVE_FROM_68)]


class FaceFinder:
    """dlib's HOG detector and landmark models: the face mask and 5 landmarks of the largest
    face in a uint8 image, or None. Needs dlib-bin (the 'faces' extra)."""

    def __init__(self, analyzer=None):
        from idguard_jax.faces.detection import FaceAnalyzer

        self.analyzer = analyzer or FaceAnalyzer()

    def find(self, image_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(face mask (S, S, 1) uint8, landmarks5 (5, 2) pixels) or None."""
        boxes = self.analyzer.detect(image_u8)
        if not len(boxes):
            return None
        pts68 = self.analyzer.landmarks68(image_u8, boxes[0])
        return (align.face_mask_from_landmarks(pts68, image_u8.shape[0]),
                self.analyzer.landmarks(image_u8, boxes[0]).astype(np.float64))


# ------------------------------------------------------------------------------------------
# Jitted pieces (each compiles once per network and image size)
# ------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _manipulate(target: targets_lib.Target, variables, x, table):
    """(C, B, S, S, 3): target's output for every condition of `table`."""
    return jax.vmap(lambda c: target.forward(variables, x, c)[0])(table)


@functools.partial(jax.jit, static_argnums=0)
def _embed(net: identity_lib.IdentityNet, variables, x, warp):
    """Raw features for a chip network (dlib descriptors), else unit-norm embeddings."""
    if net.chip_based:
        return net.features(variables, x, warp)
    return net.embed(variables, x)


def _chunked(fn, n: int, *arrays):
    """fn over the leading axis of `arrays` (pytrees) in chunks of CHUNK; a short chunk is
    padded with copies of its first row (one compiled shape), whose results are dropped."""
    out = []
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        idx = np.full(CHUNK, start)
        idx[:m] = np.arange(start, start + m)
        part = jax.tree.map(lambda a: np.asarray(a)[idx], arrays)
        out.append(np.asarray(fn(*part))[:m])
    return np.concatenate(out)


def _manipulate_all(target: targets_lib.Target, variables, x: np.ndarray,
                    labels: np.ndarray) -> np.ndarray:
    """(C, B, S, S, 3) float32: target's output for every condition of `target.conditions(labels)`
    and every image of x (B, S, S, 3), in padded chunks of CHUNK images (one compiled shape
    whatever B is, so a short last batch does not compile the network again)."""
    def chunk(xs, ls):
        y = _manipulate(target, variables, jnp.asarray(xs), target.conditions(jnp.asarray(ls)))
        return np.swapaxes(np.asarray(y), 0, 1)          # images first, as _chunked slices

    return np.swapaxes(_chunked(chunk, len(x), x, labels), 0, 1)


def _describe(judge: Judge, images: np.ndarray, landmarks5: np.ndarray | None) -> np.ndarray:
    """(N, D) judge features of float images (N, S, S, 3); landmarks5 (N, 5, 2) pixels (chip
    networks only)."""
    s = images.shape[1:3]
    if judge.net.chip_based:
        warp = chip_warps(landmarks5, s)._asdict()
        return _chunked(lambda x, w: _embed(judge.net, judge.variables, x, w), len(images),
                        images, warp)
    return _chunked(lambda x: _embed(judge.net, judge.variables, x, None), len(images), images)


def as_float(images) -> np.ndarray:
    """uint8 [0, 255] (`images.to_float`) or float [-1, 1] (B, S, S, 3) -> float32 [-1, 1]."""
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected images (B, S, S, 3), got shape {a.shape}")
    return to_float(a) if a.dtype == np.uint8 else a.astype(np.float32)


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------

def measure(models: Models, clean, protected, judge: Judge, *, labels=None,
            input_face_masks=None, finder: FaceFinder | None | str = "auto",
            recognizer: Judge | None | str = "auto", keep_images: bool = True) -> dict:
    """Every metric of one batch of (clean, protected) pairs against every target.

    Args:
      models: the targets (`load_models`).
      clean, protected: (B, S, S, 3) uint8 or float [-1, 1]; B = 1 for a single pair.
      judge: the identity judge (`make_judge`).
      labels: (B, 5) StarGAN attributes of the clean faces (default zeros).
      input_face_masks: (B, S, S, 1) whole-face masks of the clean inputs (e.g. a photos cache's
        facemasks.u8), used where no face is found on a clean output; default: found by dlib on
        the input, else the template's.
      finder: dlib face finder for masks and landmarks ('auto': FaceFinder(); None: no
        detection, masks from input_face_masks or the template).
      recognizer: dlib judge for misdirection ('auto': the judge if it is dlib, else dlib's
        offline network; None: skip, misdirected = NaN).
      keep_images: return the manipulated images (for grids).
    Returns a dict:
      'targets': {name: {'l2_face', 'id_sim', 'id_distance', 'id_destroyed', 'dsr', 'mse',
                  'mse_success', 'cmua_l2', 'cmua_success', 'misdirected', 'no_face'
                  (C, B) arrays; 'mask_source' (C, B) str; with keep_images
                  'manipulated_clean', 'manipulated_protected' (C, B, S, S, 3) float32}},
      'psnr', 'ssim', 'linf' (B,); 'input_mask_source' (B,) str; 'judge' (description);
      'criterion', 'threshold'; 'random_targets' (bool).
    """
    x, xp = as_float(clean), as_float(protected)
    if x.shape != xp.shape:
        raise ValueError(f"clean {x.shape} and protected {xp.shape} images differ in shape")
    b, s = x.shape[0], x.shape[1]
    labels = np.zeros((b, 5), np.float32) if labels is None else np.asarray(labels, np.float32)
    if finder == "auto":
        finder = FaceFinder()
    if recognizer == "auto":
        recognizer = judge if judge.net.chip_based else make_judge("dlib")

    # The clean inputs: face mask and landmarks (the fallback of every output), descriptor.
    tmpl68, tmpl5 = template_landmarks(s)
    tmpl_mask = align.face_mask_from_landmarks(tmpl68, s)
    in_mask, in_pts, in_source, in_found = [], [], [], []
    for i in range(b):
        found = finder.find(to_uint8(x[i])) if finder is not None else None
        in_found.append(found is not None)
        if input_face_masks is not None:
            in_mask.append(np.asarray(input_face_masks[i]).reshape(s, s, 1))
            in_source.append("input")
        elif found is not None:
            in_mask.append(found[0])
            in_source.append("input")
        else:
            in_mask.append(tmpl_mask)
            in_source.append("template")
        in_pts.append(found[1] if found is not None else tmpl5)
    in_pts = np.stack(in_pts)
    photo_desc = None
    if recognizer is not None:
        photo_desc = _describe(recognizer, x, in_pts)
        photo_desc[~np.asarray(in_found)] = np.nan   # no face on the photo: nothing to match

    out: dict = {"targets": {}, "psnr": metrics.psnr(x, xp), "linf": np.abs(xp - x).max((1, 2, 3)),
                 "ssim": metrics.ssim(x, xp) if s >= 11 else np.full(b, np.nan),
                 "input_mask_source": np.array(in_source), "judge": judge.describe(),
                 "criterion": judge.criterion, "threshold": judge.threshold,
                 "random_targets": models.random}
    for t in models.targets:
        v = models.variables[t.name]
        y = _manipulate_all(t, v, x, labels)
        yp = _manipulate_all(t, v, xp, labels)
        c = y.shape[0]
        masks = np.empty((c, b, s, s, 1), np.uint8)
        pts = np.empty((c, b, 5, 2))
        source = np.empty((c, b), object)
        for k in range(c):
            for i in range(b):
                found = finder.find(to_uint8(y[k, i])) if finder is not None else None
                if found is not None:
                    masks[k, i], pts[k, i], source[k, i] = found[0], found[1], "output"
                else:
                    masks[k, i], pts[k, i], source[k, i] = in_mask[i], in_pts[i], in_source[i]
        flat = (c * b, s, s, 3)
        ea = _describe(judge, y.reshape(flat), pts.reshape(c * b, 5, 2))
        eb = _describe(judge, yp.reshape(flat), pts.reshape(c * b, 5, 2))
        sim = metrics.cosine(ea, eb).reshape(c, b)
        dist = metrics.euclidean(ea, eb).reshape(c, b) if judge.criterion == "distance" \
            else np.full((c, b), np.nan)
        destroyed = metrics.identity_destroyed(sim if judge.criterion == "cosine" else dist,
                                               judge.criterion, judge.threshold)
        l2 = metrics.l2_face(y, yp, masks)
        mse = metrics.mse(y, yp)
        cmua = metrics.cmua_l2(y, yp, x[None])
        with np.errstate(invalid="ignore"):
            cmua_ok = cmua > metrics.CMUA_SUCCESS
        misdirected = np.full((c, b), np.nan)
        no_face = np.zeros((c, b), bool)
        if recognizer is not None:
            own = np.empty((c, b, 5, 2))
            for k in range(c):
                for i in range(b):
                    found = finder.find(to_uint8(yp[k, i])) if finder is not None else None
                    no_face[k, i] = found is None
                    own[k, i] = found[1] if found is not None else in_pts[i]
            desc = _describe(recognizer, yp.reshape(flat), own.reshape(c * b, 5, 2)).reshape(c, b, -1)
            with np.errstate(invalid="ignore"):
                far = metrics.euclidean(desc, photo_desc[None]) >= metrics.DLIB_SAME_PERSON
            misdirected = np.where(no_face | far, 1.0, 0.0)
            misdirected[:, ~np.asarray(in_found)] = np.nan
        res = {"l2_face": l2, "id_sim": sim, "id_distance": dist, "id_destroyed": destroyed,
               "dsr": metrics.defense_success(l2, destroyed), "mse": mse,
               "mse_success": mse > metrics.MSE_SUCCESS, "cmua_l2": cmua, "cmua_success": cmua_ok,
               "misdirected": misdirected, "no_face": no_face,
               "mask_source": source.astype(str)}
        if keep_images:
            res["manipulated_clean"], res["manipulated_protected"] = y, yp
        out["targets"][t.name] = res
    return out


_PER_IMAGE = ("psnr", "ssim", "linf", "input_mask_source")


def concatenate(parts: Sequence[dict], keep_images: int = 0) -> dict:
    """Measurements of several batches as one (images axis joined); the manipulated images of
    the first `keep_images` images only."""
    first = parts[0]
    out = {k: v for k, v in first.items() if k in ("judge", "criterion", "threshold",
                                                    "random_targets")}
    for k in _PER_IMAGE:
        out[k] = np.concatenate([p[k] for p in parts])
    out["targets"] = {}
    for name, res in first["targets"].items():
        joined = {}
        for k in res:
            if k.startswith("manipulated"):   # only the parts measured with keep_images
                joined[k] = np.concatenate([p["targets"][name][k] for p in parts
                                            if k in p["targets"][name]], 1)[:, :keep_images]
            else:
                joined[k] = np.concatenate([p["targets"][name][k] for p in parts], 1)
        out["targets"][name] = joined
    return out


def _mean(a) -> float:
    a = np.asarray(a, np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def _psnr_mean(values) -> float:
    """Mean PSNR over the changed images; inf when no image was changed at all."""
    v = np.asarray(values, np.float64)
    return _mean(v[np.isfinite(v)]) if np.isfinite(v).any() else float("inf")


def summarise(m: dict) -> dict:
    """Means over conditions and images (NaN-aware): per target the paper's columns L2_face,
    ID sim, DSR, plus ID distance, the older criteria's success rates, misdirection and where
    the face masks came from; per condition the same means ('per_condition'); overall the
    visible cost.

    NaN values are left out of their means, and counted: 'l2_face_nan' (an empty face mask; DSR
    counts such an output as a failure), 'id_sim_nan'; 'outputs' is C x B. Misdirection and
    'misdirection_no_face' are over the 'misdirection_measured' outputs whose clean photo had a
    face (misdirected finite)."""
    out = {"judge": m["judge"], "random_targets": bool(m["random_targets"]),
           "images": int(len(m["psnr"])), "psnr": _psnr_mean(m["psnr"]),
           "ssim": _mean(m["ssim"]), "linf_max": float(np.max(m["linf"])), "targets": {}}
    for name, r in m["targets"].items():
        measured = np.isfinite(np.asarray(r["misdirected"], np.float64))
        row = {"l2_face": _mean(r["l2_face"]), "id_sim": _mean(r["id_sim"]),
               "id_distance": _mean(r["id_distance"]), "dsr": _mean(r["dsr"]),
               "id_destroyed": _mean(r["id_destroyed"]), "mse": _mean(r["mse"]),
               "mse_success": _mean(r["mse_success"]), "cmua_l2": _mean(r["cmua_l2"]),
               "cmua_success": _mean(r["cmua_success"]),
               "misdirection": _mean(r["misdirected"]),
               "misdirection_no_face": _mean(np.asarray(r["no_face"])[measured])
               if measured.any() else float("nan"),
               "misdirection_measured": int(measured.sum()),
               "outputs": int(np.asarray(r["l2_face"]).size),
               "l2_face_nan": int(np.isnan(np.asarray(r["l2_face"], np.float64)).sum()),
               "id_sim_nan": int(np.isnan(np.asarray(r["id_sim"], np.float64)).sum()),
               "mask_source": {s: int(np.sum(r["mask_source"] == s)) for s in MASK_SOURCES},
               "per_condition": {k: [_mean(r[k][c]) for c in range(r[k].shape[0])]
                                 for k in ("l2_face", "id_sim", "dsr")}}
        out["targets"][name] = row
    names = list(out["targets"])
    out["average"] = {k: _mean([out["targets"][n][k] for n in names])
                      for k in ("l2_face", "id_sim", "dsr", "mse_success", "cmua_success",
                                "misdirection")}
    return out


def quantise_within(original_u8, protected, eps: float) -> np.ndarray:
    """Protected float images [-1, 1] as the uint8 photo a user would save: rounded, except
    where rounding would leave the budget eps (in [-1, 1] units) around the original."""
    orig = np.asarray(original_u8, np.float32)
    levels = np.clip(np.rint((np.asarray(protected, np.float32) + 1.0) * 127.5), 0, 255)
    lim = eps * 127.5
    return np.clip(levels, np.ceil(orig - lim - 1e-4), np.floor(orig + lim + 1e-4)).astype(np.uint8)


def to_jsonable(value):
    """numpy arrays and scalars -> lists and floats; NaN and inf -> None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value
