"""Does a protection work? Per-image measurements of the paper's metrics (IV-A4).

    models = measure.load_models(["stargan", "hisd"], "weights/", image_size=256)
    who = judge.make_judge("auto", "weights/")               # ArcFace if converted, else dlib
    m = measure.measure(models, clean, protected, who)       # one image pair or a batch
    measure.summarise(m)["targets"]["stargan"]["dsr"]

For every target and condition, the clean image x and the protected image x' are manipulated
(y = G(x, c), y' = G(x', c)), and per image:
- `l2_face`: eq. 13 on [-1, 1] images inside the whole-face mask of y (dlib's 68 landmarks on y,
  `align.face_mask_from_landmarks`); where dlib finds no face on y, the clean input's face mask
  (given, or found on x); where none is found there either, the mask of the aligned-face template
  (`align.ALIGNED_TEMPLATE_68`). `mask_source` records which, per output.
- `id_sim`: cosine similarity of the judge's embeddings of y and y'. With the dlib network also
  `id_distance` (descriptor distance); identity is destroyed when cosine < 0.4 (ArcFace, the
  paper) or distance >= 0.6 (dlib's threshold): `Judge.describe()` says which, and with which
  input normalisation (`judge.make_judge(normalisation=)`, default 'reference': what ID-Guard's code
  feeds ArcFace, [-1, 1] resized to 112 without a crop).
- `dsr`: L2_face > 0.05 AND identity destroyed (the paper's success event).
- `mse` / `mse_success` (Disrupting Deepfakes: unmasked MSE > 0.05) and `cmua_l2` /
  `cmua_success` (CMUA-Watermark's changed-pixel mask).
- `misdirected`: dlib's recogniser does not match y' to the person: no face found on y', or its
  descriptor is >= 0.6 from the CLEAN PHOTO's (NaN where dlib finds no face on the photo).
Per image also the visible cost: `psnr`, `ssim` (protected vs original) and `linf`.

dlib's descriptors are cut from dlib's 150 px face chip at landmarks: y and y' at the landmarks
of y (or the mask's fallback), as the identity loss does; y' for misdirection at its own.
Host-side dlib work (detection, landmarks; `judge.FaceFinder`) runs per output; the targets and
identity networks run jitted in chunks of `judge.CHUNK` images, the last one padded, so each
network compiles once per image size whatever the batch size (a short last batch included).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idguard_jax.evaluation import metrics
from idguard_jax.evaluation.judge import (FaceFinder, Judge, chunked, make_judge,
                                          template_landmarks)
from idguard_jax.faces import align
from idguard_jax.images import as_float_images, to_uint8
from idguard_jax.networks import targets as targets_lib

__all__ = ["Models", "load_models", "measure", "concatenate", "summarise", "MASK_SOURCES",
           "to_jsonable"]

MASK_SOURCES = ("output", "input", "template")


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
    architecture `size` ('tiny', 'demo', 'official') at `image_size`, drawn from `seed` (the
    demo trains against `targets.init_stand_ins`' networks of its cfg.seed)."""
    if not names:
        raise ValueError("name at least one target")
    if weights_dir is not None:
        loaded = [targets_lib.load(n, weights_dir) for n in names]
        return Models(tuple(t for t, _ in loaded), {t.name: v for t, v in loaded})
    made = targets_lib.init_stand_ins(names, jax.random.key(seed), image_size=image_size,
                                      size=size).values()
    return Models(tuple(t for t, _ in made), {t.name: v for t, v in made}, random=True)


@functools.partial(jax.jit, static_argnums=0)
def _manipulate(target: targets_lib.Target, variables, x, table):
    """(C, B, S, S, 3): target's output for every condition of `table` (compiles once per
    target and image size)."""
    return jax.vmap(lambda c: target.forward(variables, x, c)[0])(table)


def _manipulate_all(target: targets_lib.Target, variables, x: np.ndarray,
                    labels: np.ndarray) -> np.ndarray:
    """(C, B, S, S, 3) float32: target's output for every condition of `target.conditions(labels)`
    and every image of x (B, S, S, 3), in padded chunks of CHUNK images (one compiled shape
    whatever B is, so a short last batch does not compile the network again)."""
    def chunk(xs, ls):
        y = _manipulate(target, variables, jnp.asarray(xs), target.conditions(jnp.asarray(ls)))
        return np.swapaxes(np.asarray(y), 0, 1)          # images first, as chunked slices

    return np.swapaxes(chunked(chunk, len(x), x, labels), 0, 1)


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Inputs:
    """The clean inputs' faces, the fallback of every output: per image a face mask
    (S, S, 1), dlib-5 landmarks (5, 2) pixels, where the mask came from, whether dlib found a
    face, and (with a recognizer) the photo's dlib descriptor (NaN without a face)."""
    masks: list
    points: np.ndarray
    sources: list
    found: np.ndarray
    descriptors: np.ndarray | None = None


def measure(models: Models, clean, protected, judge: Judge, *, labels=None,
            input_face_masks=None, finder: FaceFinder | None | str = "auto",
            recognizer: Judge | None | str = "auto", keep_images: bool = True) -> dict:
    """Every metric of one batch of (clean, protected) pairs against every target.

    Args:
      models: the targets (`load_models`).
      clean, protected: (B, S, S, 3) uint8 or float [-1, 1]; B = 1 for a single pair.
      judge: the identity judge (`judge.make_judge`).
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
    x, xp = _image_pair(clean, protected)
    b = x.shape[0]
    labels = np.zeros((b, 5), np.float32) if labels is None else np.asarray(labels, np.float32)
    if finder == "auto":
        finder = FaceFinder()
    if recognizer == "auto":
        recognizer = judge if judge.net.chip_based else make_judge("dlib")
    inputs = input_faces(x, finder, input_face_masks, recognizer)
    out = {"targets": {}, **_visible_cost(x, xp),
           "input_mask_source": np.array(inputs.sources), "judge": judge.describe(),
           "criterion": judge.criterion, "threshold": judge.threshold,
           "random_targets": models.random}
    for t in models.targets:
        out["targets"][t.name] = _measure_target(t, models.variables[t.name], x, xp, labels,
                                                 judge, finder, recognizer, inputs, keep_images)
    return out


def _image_pair(clean, protected) -> tuple[np.ndarray, np.ndarray]:
    """Both batches as float32 [-1, 1] (B, S, S, 3), refusing other or differing shapes."""
    x, xp = np.asarray(as_float_images(clean)), np.asarray(as_float_images(protected))
    for name, a in (("clean", x), ("protected", xp)):
        if a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"{name} images: expected (B, S, S, 3), got shape {a.shape}")
    if x.shape != xp.shape:
        raise ValueError(f"clean {x.shape} and protected {xp.shape} images differ in shape")
    return x, xp


def _find(finder: FaceFinder | None, image: np.ndarray):
    """dlib's (mask, landmarks5) of a float [-1, 1] image, or None (no face, or no finder)."""
    return finder.find(to_uint8(image)) if finder is not None else None


def input_faces(x: np.ndarray, finder, input_face_masks, recognizer) -> _Inputs:
    """Face masks and landmarks of the clean inputs: given masks, else dlib's, else the
    template's; and the photos' descriptors for misdirection."""
    b, s = x.shape[0], x.shape[1]
    tmpl68, tmpl5 = template_landmarks(s)
    tmpl_mask = align.face_mask_from_landmarks(tmpl68, s)
    masks, points, sources, found_any = [], [], [], []
    for i in range(b):
        found = _find(finder, x[i])
        found_any.append(found is not None)
        if input_face_masks is not None:
            masks.append(np.asarray(input_face_masks[i]).reshape(s, s, 1))
            sources.append("input")
        elif found is not None:
            masks.append(found[0])
            sources.append("input")
        else:
            masks.append(tmpl_mask)
            sources.append("template")
        points.append(found[1] if found is not None else tmpl5)
    inputs = _Inputs(masks, np.stack(points), sources, np.asarray(found_any))
    if recognizer is not None:
        inputs.descriptors = recognizer.describe_images(x, inputs.points)
        inputs.descriptors[~inputs.found] = np.nan   # no face on the photo: nothing to match
    return inputs


def _visible_cost(x: np.ndarray, xp: np.ndarray) -> dict:
    """Per image: 'psnr', 'ssim' (NaN below 11 px) and 'linf' of protected vs original."""
    b, s = x.shape[0], x.shape[1]
    return {"psnr": metrics.psnr(x, xp), "linf": np.abs(xp - x).max((1, 2, 3)),
            "ssim": metrics.ssim(x, xp) if s >= 11 else np.full(b, np.nan)}


def _measure_target(target, variables, x, xp, labels, judge: Judge, finder, recognizer,
                    inputs: _Inputs, keep_images: bool) -> dict:
    """Every per-output metric of one target: (C, B) arrays (see `measure`)."""
    y = _manipulate_all(target, variables, x, labels)
    yp = _manipulate_all(target, variables, xp, labels)
    masks, points, source = _output_faces(y, finder, inputs)
    sim, dist, destroyed = _identity(judge, y, yp, points)
    l2 = metrics.l2_face(y, yp, masks)
    mse = metrics.mse(y, yp)
    cmua = metrics.cmua_l2(y, yp, x[None])
    with np.errstate(invalid="ignore"):
        cmua_ok = cmua > metrics.CMUA_SUCCESS
    misdirected, no_face = _misdirection(recognizer, finder, yp, inputs)
    res = {"l2_face": l2, "id_sim": sim, "id_distance": dist, "id_destroyed": destroyed,
           "dsr": metrics.defense_success(l2, destroyed), "mse": mse,
           "mse_success": mse > metrics.MSE_SUCCESS, "cmua_l2": cmua, "cmua_success": cmua_ok,
           "misdirected": misdirected, "no_face": no_face, "mask_source": source.astype(str)}
    if keep_images:
        res["manipulated_clean"], res["manipulated_protected"] = y, yp
    return res


def _output_faces(y: np.ndarray, finder, inputs: _Inputs):
    """Face masks (C, B, S, S, 1), landmarks (C, B, 5, 2) and their source (C, B) of the clean
    outputs y (C, B, S, S, 3): dlib's on the output, else the clean input's."""
    c, b, s = y.shape[:3]
    masks = np.empty((c, b, s, s, 1), np.uint8)
    points = np.empty((c, b, 5, 2))
    source = np.empty((c, b), object)
    for k in range(c):
        for i in range(b):
            found = _find(finder, y[k, i])
            if found is not None:
                masks[k, i], points[k, i], source[k, i] = found[0], found[1], "output"
            else:
                masks[k, i], points[k, i] = inputs.masks[i], inputs.points[i]
                source[k, i] = inputs.sources[i]
    return masks, points, source


def _identity(judge: Judge, y: np.ndarray, yp: np.ndarray, points: np.ndarray):
    """(C, B) cosine similarity, descriptor distance (NaN unless the judge uses distance) and
    identity destroyed, of the judge's features of y and yp (chips at `points`)."""
    c, b, s = y.shape[:3]
    flat, pts = (c * b, s, s, 3), points.reshape(c * b, 5, 2)
    ea = judge.describe_images(y.reshape(flat), pts)
    eb = judge.describe_images(yp.reshape(flat), pts)
    sim = metrics.cosine(ea, eb).reshape(c, b)
    dist = metrics.euclidean(ea, eb).reshape(c, b) if judge.criterion == "distance" \
        else np.full((c, b), np.nan)
    destroyed = metrics.identity_destroyed(sim if judge.criterion == "cosine" else dist,
                                           judge.criterion, judge.threshold)
    return sim, dist, destroyed


def distances_to_photos(recognizer: Judge, finder, outputs: np.ndarray, inputs: _Inputs):
    """(C, B) dlib descriptor distance of each output (C, B, S, S, 3) to its clean photo's
    (`input_faces`; NaN where the photo has no face), the output described at its own
    landmarks, at the photo's where dlib finds no face on it; and that no_face (C, B)."""
    c, b, s = outputs.shape[:3]
    no_face = np.zeros((c, b), bool)
    own = np.empty((c, b, 5, 2))
    for k in range(c):
        for i in range(b):
            found = _find(finder, outputs[k, i])
            no_face[k, i] = found is None
            own[k, i] = found[1] if found is not None else inputs.points[i]
    desc = recognizer.describe_images(outputs.reshape(c * b, s, s, 3),
                                      own.reshape(c * b, 5, 2)).reshape(c, b, -1)
    return metrics.euclidean(desc, inputs.descriptors[None]), no_face


def _misdirection(recognizer: Judge | None, finder, yp: np.ndarray, inputs: _Inputs):
    """(C, B) misdirected (1 when dlib finds no face on yp or its descriptor is >= 0.6 from the
    clean photo's; NaN where the photo has no face or without a recognizer) and no_face."""
    c, b = yp.shape[:2]
    if recognizer is None:
        return np.full((c, b), np.nan), np.zeros((c, b), bool)
    distance, no_face = distances_to_photos(recognizer, finder, yp, inputs)
    with np.errstate(invalid="ignore"):
        far = distance >= metrics.DLIB_SAME_PERSON
    misdirected = np.where(no_face | far, 1.0, 0.0)
    misdirected[:, ~inputs.found] = np.nan
    return misdirected, no_face


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
