"""Who judges identity in an evaluation, and where the faces are.

    j = make_judge("auto", "weights/")               # ArcFace if converted, else dlib
    emb = j.describe_images(images, landmarks5)      # (N, D) the judge's features
    found = FaceFinder().find(image_u8)              # (face mask, 5 landmarks) or None

`Judge` holds the identity network that decides "identity destroyed" and its criterion (cosine
< 0.4 for ArcFace, the paper; descriptor distance >= 0.6 for dlib); `FaceFinder` is dlib's
detector and landmarks, the source of the face masks and of dlib's chips. Networks run jitted in
chunks of `CHUNK` images, the last one padded, so each compiles once per image size whatever
the batch size.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np

from idguard_jax.evaluation import metrics
from idguard_jax.faces import align
from idguard_jax.networks import identity as identity_lib
from idguard_jax.networks.dlib_chips import chip_warps

__all__ = ["Judge", "make_judge", "FaceFinder", "template_landmarks", "chunked", "CHUNK"]

CHUNK = 8
# dlib 5-point landmark order as 68-point indices: outer and inner corner of the image-right
# eye, outer and inner corner of the image-left eye, the bottom of the nose (checked against
# dlib's 5-point model on the shared faces: within 2 px).
_FIVE_FROM_68 = (45, 42, 36, 39, 33)


def chunked(fn, n: int, *arrays) -> np.ndarray:
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


@functools.partial(jax.jit, static_argnums=0)
def _embed(net: identity_lib.IdentityNet, variables, x, warp):
    """Raw features for a chip network (dlib descriptors), else unit-norm embeddings."""
    if net.chip_based:
        return net.features(variables, x, warp)
    return net.embed(variables, x)


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

    def describe_images(self, images: np.ndarray, landmarks5: np.ndarray | None) -> np.ndarray:
        """(N, D) features of float images (N, S, S, 3) in [-1, 1]: dlib's raw descriptors of
        the chips at landmarks5 (N, 5, 2) pixels (chip networks only), else unit-norm
        embeddings."""
        if self.net.chip_based:
            warp = chip_warps(landmarks5, images.shape[1:3])
            return chunked(lambda x, w: _embed(self.net, self.variables, x, w), len(images),
                           images, warp)
        return chunked(lambda x: _embed(self.net, self.variables, x, None), len(images), images)


def make_judge(name: str = "auto", weights_dir: str | os.PathLike | None = None,
               seed: int = 0, normalisation: str = "reference", **config) -> Judge:
    """'auto': a converted ArcFace in weights_dir (the paper's judge), else dlib's offline
    network. Also any identity network name; 'standin' is random (tests only; `config`: its
    architecture fields).

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
        net, variables = identity_lib.init_random(name, jax.random.key(seed), config=config,
                                                  normalisation=normalisation)
        return Judge(net, variables, random=True)
    if config:
        raise ValueError(f"identity judge {name!r}: architecture fields {sorted(config)} are "
                         "read from its bundle, not given")
    if name == "dlib":
        net, variables = identity_lib.load("dlib", weights_dir or "", normalisation=normalisation)
        return Judge(net, variables, "distance", metrics.DLIB_SAME_PERSON)
    if weights_dir is None:
        raise ValueError(f"identity judge {name!r} needs --weights with its converted bundle")
    net, variables = identity_lib.load(name, weights_dir, normalisation=normalisation)
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
