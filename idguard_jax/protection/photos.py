"""Protect ordinary photos: every face found, protected in the generator's aligned frame, and the
PERTURBATION (not a resampled face) warped back and added at full resolution.

    gen = protect.load("weights/generator")
    outcomes = photos.protect_photos(gen, [("in/a.jpg", "out/a.jpg"), ...])

Per photo: decode (photo_io.read_photo: format, mode, frames, EXIF orientation and metadata
kept) -> dlib detection and 68 landmarks on the upright picture (every frame of an animation)
-> each face aligned to the generator's
S x S frame (align.analyse_image) -> faces of many photos batched through the jitted protection
function -> each face's delta = x_adv - x warped back (align.warp_to_photo), summed, clipped to
eps in the photo's own 0..255 scale (eps 0.05 in [-1, 1] units = 6.375 grey levels, so at most
6) -> written in the input's format (a GIF as PNG, see photo_io.output_format) with its
metadata, to a temporary name, then renamed.

One bad photo never stops the rest: each photo gets an `Outcome`, with the reason if it failed.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import threading
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from idguard_jax.evaluation import metrics
from idguard_jax.faces import align
from idguard_jax.generator import Generator
from idguard_jax.images import clip_to_budget, to_float
from idguard_jax.protection import faces as protect
from idguard_jax.protection.pipeline import Pipeline
from idguard_jax.protection.profile import NullTimer, TimedAnalyzer
from idguard_jax.protection.photo_io import (Photo, decode_frames, encode_photo, orient,
                                             output_format, read_photo, unorient,
                                             writes_upright)

__all__ = ["Outcome", "PhotoOptions", "protect_photos", "perturbation_for_photo", "encode_keeping",
           "JPEG_QUALITIES", "AVIF_QUALITIES", "QUALITIES",
           "apply_perturbation", "TMP_MARK", "PROTECTED", "NO_FACE", "FAILED", "COPIED"]

PROTECTED, NO_FACE, COPIED, FAILED = "protected", "no face", "copied (no face)", "failed"
TMP_MARK = ".idguard-tmp"   # temporary outputs: ".NAME.idguard-tmp-PID", renamed when complete
# JPEG qualities 'auto' tries, lowest first (all with 4:4:4 chroma). On the shared photos with a
# noise-like perturbation, 95 / 98 / 100 keep about 74% / 86% / 91% of its energy at 1.5x / 2x /
# 3.4x the input's file size.
JPEG_QUALITIES = (95, 98, 100)
# AVIF likewise (4:4:4; Pillow's AVIF is never lossless: it always converts to YCbCr). On the
# shared photos with +-6 grey levels of noise, 95 / 98 / 100 keep about 61% / 81% / 94%.
AVIF_QUALITIES = (95, 98, 100)
QUALITIES = {"JPEG": JPEG_QUALITIES, "AVIF": AVIF_QUALITIES}


@dataclasses.dataclass(frozen=True)
class PhotoOptions:
    """How photos are protected and written.

    eps: L-inf budget in [-1, 1] units (None: the generator's training eps); min_face: faces
    with a detection box narrower than this (px) are reported, not protected; no_face: 'skip' or
    'copy' photos without a usable face; output_format: None (the input's; a GIF's is PNG
    unless keep_gif, see photo_io.output_format) or a PIL format name ('PNG'); jpeg_quality: for
    JPEG and AVIF outputs (4:4:4 chroma), 1-100 or 'auto' (see encode_keeping, with `keep` the
    share of the perturbation's energy to keep); strip_metadata: drop EXIF/XMP/text;
    detect_max_side: larger photos are searched for faces at this size; batch_size: faces per
    generator call (across photos); workers: threads decoding, detecting and encoding."""
    eps: float | None = None
    min_face: int = 64
    no_face: str = "skip"
    output_format: str | None = None
    keep_gif: bool = False
    jpeg_quality: int | str = "auto"
    keep: float = 0.9
    strip_metadata: bool = False
    detect_max_side: int = 2048
    batch_size: int = 16
    workers: int = 2


@dataclasses.dataclass
class Outcome:
    """What happened to one input. status: PROTECTED, NO_FACE, COPIED or FAILED. faces: faces
    protected; too_small: faces found but too small (not protected). psnr/ssim: visible cost,
    measured on the written file inside the box around the changed pixels. kept: share of the
    perturbation's energy the written file keeps (1.0 when lossless). written: the encoding."""
    source: str
    output: str | None
    status: str
    faces: int = 0
    too_small: int = 0
    psnr: float | None = None
    ssim: float | None = None
    kept: float | None = None
    written: dict | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def perturbation_for_photo(deltas: Sequence[np.ndarray], transforms: Sequence[np.ndarray],
                           upright_shape: tuple[int, int], eps: float) -> np.ndarray:
    """Faces' perturbations (S, S, 3) in [-1, 1] units, each warped from its aligned frame back
    into the upright photo (H, W) and summed; clipped to [-eps, eps] where faces overlap.
    Returns (H, W, 3) float32 in [-1, 1] units."""
    total = np.zeros(tuple(upright_shape) + (3,), np.float32)
    for delta, transform in zip(deltas, transforms):
        total += align.warp_to_photo(delta, transform, upright_shape)
    return np.clip(total, -eps, eps)


def apply_perturbation(photo: Photo, delta_upright: np.ndarray, eps: float) -> np.ndarray:
    """Add a perturbation (H, W, 3) in [-1, 1] units, upright, to the photo's stored pixels.

    Returns uint8 pixels in the photo's stored layout and mode. Every colour value moves by at
    most `images.eps_grey_levels(eps)` grey levels (6 for eps 0.05): rounding is pulled back
    inside the budget (`images.clip_to_budget`). Grey photos get the channel mean of the
    perturbation; alpha is left as it was."""
    delta = unorient(delta_upright, photo.orientation) * 127.5   # grey levels, stored layout
    out = photo.stored.copy()
    colour = 3 if photo.mode in ("RGB", "RGBA") else 1
    if colour == 1:
        delta = delta.mean(-1, keepdims=True)
    orig = photo.stored[..., :colour]
    out[..., :colour] = clip_to_budget(np.rint(orig.astype(np.float32) + delta), orig, eps)
    return out


@dataclasses.dataclass
class _Analysed:
    index: int                     # position in the job list
    source: str
    output: str
    photo: Photo | None = None
    faces: list = dataclasses.field(default_factory=list)     # align.AlignedFace, status OK
    face_frames: list = dataclasses.field(default_factory=list)   # each face's frame index
    too_small: int = 0
    deltas: list = dataclasses.field(default_factory=list)
    error: str | None = None


def _visible_cost(original: np.ndarray, written: np.ndarray, intended: np.ndarray,
                  kept_only: bool = False) -> tuple[float | None, float | None, float]:
    """PSNR and SSIM of the written pixels against the original, inside the bounding box of the
    pixels the protection changed (elsewhere nothing changed, and counting it would flatter
    both), and `kept`: the share of the intended change's energy the encoding kept (1 - error
    energy / change energy, floored at 0). All (H, W, C) uint8 in one layout. `kept_only`:
    PSNR and SSIM are None (SSIM is most of the cost; a quality search needs only `kept`)."""
    changed = np.any(intended != original, axis=-1)
    ys, xs = np.nonzero(changed)
    if not len(ys):
        return None, None, 1.0
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    a, b, c = original[box], written[box], intended[box]
    psnr = None if kept_only else float(metrics.psnr(a, b))
    ssim = float(metrics.ssim(a, b)) if min(a.shape[:2]) >= 11 and not kept_only else None
    want = ((c.astype(np.float64) - a) ** 2).sum()
    err = ((b.astype(np.float64) - c) ** 2).sum()
    return psnr, ssim, float(max(0.0, 1.0 - err / want))


def _repeats_merged(decoded: list, intended: list, original: list) -> tuple[list, list]:
    """APNG and GIF writers merge a frame equal to the one before into it (adding durations):
    drop such frames from `intended` and `original` too, so frame i is frame i in all three."""
    if len(decoded) == len(intended):
        return intended, original
    kept = [i for i in range(len(intended))
            if i == 0 or not np.array_equal(intended[i], intended[i - 1])]
    if len(kept) != len(decoded):
        raise ValueError(f"{len(intended)} frames written, {len(decoded)} read back")
    return [intended[i] for i in kept], [original[i] for i in kept]


def _encode_measured(photo: Photo, layers: list, fmt: str, quality: int, strip_metadata: bool,
                     kept_only: bool = False) -> tuple[bytes, dict, list, list]:
    """One encoding of every frame, its PSNR/SSIM/kept (see `_visible_cost`, over all frames
    stacked) in what was done, the decoded frames, and (original, decoded, intended) stacked
    (what `_visible_cost` measured)."""
    data, done = encode_photo(photo, layers[0], frames=layers[1:], format=fmt,
                              quality=int(quality), strip_metadata=strip_metadata)
    intended, original = layers, photo.layers()
    if writes_upright(photo, fmt, strip_metadata):
        intended = [orient(a, photo.orientation) for a in intended]
        original = [orient(a, photo.orientation) for a in original]
    decoded = decode_frames(data, photo.mode)
    intended, original = _repeats_merged(decoded, intended, original)
    stacked = [np.concatenate(a, axis=0) for a in (original, decoded, intended)]
    psnr, ssim, kept = _visible_cost(*stacked, kept_only=kept_only)
    done.update(psnr=psnr, ssim=ssim, kept=kept)
    return data, done, decoded, stacked


def encode_keeping(photo: Photo, stored: np.ndarray, options: "PhotoOptions",
                   frames: Sequence[np.ndarray] = ()) -> tuple[bytes, dict, np.ndarray]:
    """Encode the protected pixels (`frames`: an animation's further frames) as options say:
    (file bytes, what was done, decoded first frame in the written layout). JPEG and AVIF at
    quality 'auto' try QUALITIES[format] in turn and keep the first whose decoded pixels keep
    >= options.keep of the perturbation's energy (else the last); the choice and the share
    kept are reported in what was done (PSNR and SSIM measured on the chosen one only)."""
    fmt = output_format(photo.format, options.output_format, options.keep_gif)
    auto = fmt in QUALITIES and options.jpeg_quality == "auto"
    qualities = QUALITIES[fmt] if auto else (options.jpeg_quality if fmt in QUALITIES else 95,)
    for quality in qualities:
        data, done, decoded, stacked = _encode_measured(
            photo, [stored, *frames], fmt, quality, options.strip_metadata, kept_only=auto)
        if not auto or done["kept"] >= options.keep:
            break
    if auto:
        done["psnr"], done["ssim"], _ = _visible_cost(*stacked)
        done["quality_rule"] = f"lowest of {list(QUALITIES[fmt])} keeping >= {options.keep:.0%}"
    return data, done, decoded[0]


def _tmp_path(output: str) -> str:
    folder, name = os.path.split(output)
    return os.path.join(folder, f".{name}{TMP_MARK}-{os.getpid()}")


def _write_atomic(output: str, data: bytes) -> None:
    """Write through a temporary name in the same folder, then rename: an output either exists
    whole or not at all (what --resume relies on)."""
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    tmp = _tmp_path(output)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def protect_photos(gen: Generator, jobs: Iterable[tuple[str, str]],
                   options: PhotoOptions = PhotoOptions(), *, analyzer_factory=None,
                   on_result: Callable[[Outcome], None] | None = None,
                   timer=None) -> list[Outcome]:
    """Protect each (source, output) photo; returns one Outcome per job, in input order.

    Outputs are written (atomically) as soon as their faces are done; `on_result` is called for
    each, in input order. The caller decides what may be overwritten: existing outputs are
    replaced. `analyzer_factory()` makes a faces.detection.FaceAnalyzer (one per worker thread).
    `timer` (a profile.StageTimer) collects the seconds of each stage; it changes no output."""
    if options.no_face not in ("skip", "copy"):
        raise ValueError(f"no_face must be 'skip' or 'copy', got {options.no_face!r}")
    eps = gen.config.eps if options.eps is None else float(options.eps)
    if analyzer_factory is None:
        from idguard_jax.faces.detection import FaceAnalyzer
        analyzer_factory = FaceAnalyzer
    jobs = list(jobs)
    timer = timer or NullTimer()
    analyse = _Analyser(jobs, analyzer_factory, gen.config.image_size, options, timer)
    with cf.ThreadPoolExecutor(max(1, options.workers)) as pool:
        pipeline = Pipeline(pool, len(jobs), analyse,
                            lambda item: _finish(item, options, eps, timer),
                            lambda waiting: _protect_batch(gen, waiting, options.batch_size, eps,
                                                           timer),
                            options.batch_size, options.workers, on_result)
        return pipeline.run()


class _Analyser:
    """Step 1 of a photo, in a worker thread: decode it, find and align its faces (one
    FaceAnalyzer per thread, wrapped to time detection and landmarks; the rest of the analysis
    counts as alignment)."""

    def __init__(self, jobs: list, analyzer_factory, size: int, options: PhotoOptions, timer):
        self.jobs, self.factory, self.size, self.options = jobs, analyzer_factory, size, options
        self.timer = timer
        self.local = threading.local()

    def __call__(self, index: int) -> _Analysed:
        source, output = self.jobs[index]
        item = _Analysed(index, source, output)
        try:
            if not hasattr(self.local, "analyzer"):
                self.local.analyzer = TimedAnalyzer(self.factory(), self.timer)
            analyzer = self.local.analyzer
            with self.timer.stage("reading"):
                item.photo = read_photo(source)
                frames = list(item.photo.upright_frames())
            for frame, upright in enumerate(frames):
                t0, spent = time.perf_counter(), analyzer.spent
                faces = align.analyse_image(upright, analyzer, self.size,
                                            self.options.min_face, self.options.detect_max_side)
                self.timer.add("alignment", time.perf_counter() - t0 - (analyzer.spent - spent))
                usable = [f for f in faces if f.status == align.OK]
                item.faces += usable
                item.face_frames += [frame] * len(usable)
                item.too_small += len(faces) - len(usable)
        except Exception as e:  # one bad photo never stops the batch: say why, go on
            item.error = str(e) if isinstance(e, ValueError) else f"{source}: {e!r}"
        return item


def _protected_layers(item: _Analysed, eps: float) -> list[np.ndarray]:
    """Every frame of the photo with its own faces' perturbations added (frames without a face
    unchanged), in the stored layout."""
    photo, layers = item.photo, item.photo.layers()
    for frame in sorted(set(item.face_frames)):
        mine = [i for i, f in enumerate(item.face_frames) if f == frame]
        delta = perturbation_for_photo([item.deltas[i] for i in mine],
                                       [item.faces[i].transform for i in mine],
                                       photo.upright.shape[:2], eps)
        layers[frame] = apply_perturbation(dataclasses.replace(photo, stored=layers[frame]),
                                           delta, eps)
    return layers


def _finish(item: _Analysed, options: PhotoOptions, eps: float, timer) -> Outcome:
    """Step 3 of a photo, in a worker thread: add its faces' perturbations (or copy or skip a
    photo without faces), encode and write it; its Outcome."""
    out = Outcome(item.source, item.output, FAILED, too_small=item.too_small)
    try:
        if item.error:
            raise ValueError(item.error)
        photo = item.photo
        if not item.faces:
            if options.no_face == "skip":
                out.status, out.output = NO_FACE, None
                return out
            with timer.stage("encoding"):
                data, out.written, _ = encode_keeping(photo, photo.stored, options, photo.frames)
            with timer.stage("writing"):
                _write_atomic(item.output, data)
            out.status = COPIED
            return out
        with timer.stage("warp-back"):
            layers = _protected_layers(item, eps)
        with timer.stage("encoding"):
            data, out.written, _ = encode_keeping(photo, layers[0], options, layers[1:])
        with timer.stage("writing"):
            _write_atomic(item.output, data)
        out.psnr, out.ssim, out.kept = (out.written.pop(k) for k in ("psnr", "ssim", "kept"))
        out.status, out.faces = PROTECTED, len(item.faces)
    except Exception as e:
        out.status, out.output = FAILED, None
        out.error = str(e) if isinstance(e, (ValueError, OSError)) else f"{item.source}: {e!r}"
    return out


def _protect_batch(gen: Generator, waiting: list, batch_size: int, eps: float, timer) -> None:
    """Protect up to batch_size of the waiting faces (in order), appending each face's
    delta = x_adv - x (S, S, 3) float32 to its photo's list."""
    owners, faces = [], []
    for item in waiting:
        for face in item.faces[len(item.deltas):]:
            if len(faces) == batch_size:
                break
            owners.append(item)
            faces.append(face.image)
    x = to_float(np.stack(faces))
    try:
        with timer.stage("protection"):
            x_adv = protect.protect(gen, x, eps=eps, max_bucket=max(batch_size, 1))
        deltas = list(x_adv - x)
    except Exception as e:   # say which photos were lost, keep the others going
        for item in owners:
            item.error = item.error or f"{item.source}: protection failed ({e!r})"
            item.deltas = [None] * len(item.faces)
        return
    for item, delta in zip(owners, deltas):
        item.deltas.append(delta)
