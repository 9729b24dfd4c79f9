"""Protect ordinary photos: every face found, protected in the generator's aligned frame, and the
PERTURBATION (not a resampled face) warped back and added at full resolution.

    gen = protect.load("weights/generator")
    outcomes = photos.protect_photos(gen, [("in/a.jpg", "out/a.jpg"), ...])

Per photo: decode (photo_io.read_photo: format, mode, EXIF orientation and metadata kept) ->
dlib detection and 68 landmarks on the upright picture -> each face aligned to the generator's
S x S frame (align.analyse_image) -> faces of many photos batched through the jitted protection
function -> each face's delta = x_adv - x warped back (align.warp_to_photo), summed, clipped to
eps in the photo's own 0..255 scale (eps 0.05 in [-1, 1] units = 6.375 grey levels, so at most
6) -> written in the input's format with its metadata, to a temporary name, then renamed.

One bad photo never stops the rest: each photo gets an `Outcome`, with the reason if it failed.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import threading
from typing import Callable, Iterable, Sequence

import numpy as np

from idguard_jax.evaluation import metrics
from idguard_jax.faces import align
from idguard_jax.generator import Generator
from idguard_jax.images import clip_to_budget, to_float
from idguard_jax.protection import faces as protect
from idguard_jax.protection.photo_io import (Photo, decode_stored, encode_photo, orient,
                                             read_photo, unorient)

__all__ = ["Outcome", "PhotoOptions", "protect_photos", "perturbation_for_photo", "encode_keeping",
           "JPEG_QUALITIES",
           "apply_perturbation", "TMP_MARK", "PROTECTED", "NO_FACE", "FAILED", "COPIED"]

PROTECTED, NO_FACE, COPIED, FAILED = "protected", "no face", "copied (no face)", "failed"
TMP_MARK = ".idguard-tmp"   # temporary outputs: ".NAME.idguard-tmp-PID", renamed when complete
# JPEG qualities 'auto' tries, lowest first (all with 4:4:4 chroma). On the shared photos with a
# noise-like perturbation, 95 / 98 / 100 keep about 74% / 86% / 91% of its energy at 1.5x / 2x /
# 3.4x the input's file size.
JPEG_QUALITIES = (95, 98, 100)


@dataclasses.dataclass(frozen=True)
class PhotoOptions:
    """How photos are protected and written.

    eps: L-inf budget in [-1, 1] units (None: the generator's training eps); min_face: faces
    with a detection box narrower than this (px) are reported, not protected; no_face: 'skip' or
    'copy' photos without a usable face; output_format: None (the input's) or a PIL format name
    ('PNG'); jpeg_quality: for JPEG outputs (4:4:4 chroma), 1-100 or 'auto' (see encode_keeping,
    with `keep` the share of the perturbation's energy to keep); strip_metadata: drop EXIF/XMP/text;
    detect_max_side: larger photos are searched for faces at this size; batch_size: faces per
    generator call (across photos); workers: threads decoding, detecting and encoding."""
    eps: float | None = None
    min_face: int = 64
    no_face: str = "skip"
    output_format: str | None = None
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
    too_small: int = 0
    deltas: list = dataclasses.field(default_factory=list)
    error: str | None = None


def _visible_cost(original: np.ndarray, written: np.ndarray, intended: np.ndarray
                  ) -> tuple[float | None, float | None, float]:
    """PSNR and SSIM of the written pixels against the original, inside the bounding box of the
    pixels the protection changed (elsewhere nothing changed, and counting it would flatter
    both), and `kept`: the share of the intended change's energy the encoding kept (1 - error
    energy / change energy, floored at 0). All (H, W, C) uint8 in one layout."""
    changed = np.any(intended != original, axis=-1)
    ys, xs = np.nonzero(changed)
    if not len(ys):
        return None, None, 1.0
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    a, b, c = original[box], written[box], intended[box]
    psnr = float(metrics.psnr(a, b))
    ssim = float(metrics.ssim(a, b)) if min(a.shape[:2]) >= 11 else None
    want = ((c.astype(np.float64) - a) ** 2).sum()
    err = ((b.astype(np.float64) - c) ** 2).sum()
    return psnr, ssim, float(max(0.0, 1.0 - err / want))


def encode_keeping(photo: Photo, stored: np.ndarray, options: "PhotoOptions"
                   ) -> tuple[bytes, dict, np.ndarray]:
    """Encode the protected pixels as options say: (file bytes, what was done, decoded pixels
    in the written layout). JPEG at quality 'auto' tries JPEG_QUALITIES in turn and keeps the
    first whose decoded pixels keep >= options.keep of the perturbation's energy (else the
    last); the choice and the share kept are reported in what was done."""
    fmt = options.output_format or photo.format
    intended, original = stored, photo.stored
    if options.strip_metadata:   # written upright
        intended, original = orient(stored, photo.orientation), orient(original, photo.orientation)
    auto = fmt == "JPEG" and options.jpeg_quality == "auto"
    qualities = JPEG_QUALITIES if auto else (options.jpeg_quality if fmt == "JPEG" else 95,)
    for quality in qualities:
        data, done = encode_photo(photo, stored, format=fmt, jpeg_quality=int(quality),
                                  strip_metadata=options.strip_metadata)
        decoded = decode_stored(data, photo.mode)
        psnr, ssim, kept = _visible_cost(original, decoded, intended)
        if not auto or kept >= options.keep:
            break
    done.update(psnr=psnr, ssim=ssim, kept=kept)
    if auto:
        done["quality_rule"] = f"lowest of {list(JPEG_QUALITIES)} keeping >= {options.keep:.0%}"
    return data, done, decoded


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
                   on_result: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Protect each (source, output) photo; returns one Outcome per job, in input order.

    Outputs are written (atomically) as soon as their faces are done; `on_result` is called for
    each, in input order. The caller decides what may be overwritten: existing outputs are
    replaced. `analyzer_factory()` makes a faces.detection.FaceAnalyzer (one per worker thread)."""
    if options.no_face not in ("skip", "copy"):
        raise ValueError(f"no_face must be 'skip' or 'copy', got {options.no_face!r}")
    eps = gen.config.eps if options.eps is None else float(options.eps)
    if analyzer_factory is None:
        from idguard_jax.faces.detection import FaceAnalyzer
        analyzer_factory = FaceAnalyzer
    jobs = list(jobs)
    analyse = _Analyser(jobs, analyzer_factory, gen.config.image_size, options)
    with cf.ThreadPoolExecutor(max(1, options.workers)) as pool:
        pipeline = _Pipeline(pool, len(jobs), analyse, lambda item: _finish(item, options, eps),
                             lambda waiting: _protect_batch(gen, waiting, options.batch_size, eps),
                             options, on_result)
        return pipeline.run()


class _Analyser:
    """Step 1 of a photo, in a worker thread: decode it, find and align its faces (one
    FaceAnalyzer per thread)."""

    def __init__(self, jobs: list, analyzer_factory, size: int, options: PhotoOptions):
        self.jobs, self.factory, self.size, self.options = jobs, analyzer_factory, size, options
        self.local = threading.local()

    def __call__(self, index: int) -> _Analysed:
        source, output = self.jobs[index]
        item = _Analysed(index, source, output)
        try:
            if not hasattr(self.local, "analyzer"):
                self.local.analyzer = self.factory()
            item.photo = read_photo(source)
            faces = align.analyse_image(item.photo.upright, self.local.analyzer, self.size,
                                        self.options.min_face, self.options.detect_max_side)
            item.faces = [f for f in faces if f.status == align.OK]
            item.too_small = len(faces) - len(item.faces)
        except Exception as e:  # one bad photo never stops the batch: say why, go on
            item.error = str(e) if isinstance(e, ValueError) else f"{source}: {e!r}"
        return item


def _finish(item: _Analysed, options: PhotoOptions, eps: float) -> Outcome:
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
            data, out.written, _ = encode_keeping(photo, photo.stored, options)
            _write_atomic(item.output, data)
            out.status = COPIED
            return out
        delta = perturbation_for_photo(item.deltas, [f.transform for f in item.faces],
                                       photo.upright.shape[:2], eps)
        stored = apply_perturbation(photo, delta, eps)
        data, out.written, _ = encode_keeping(photo, stored, options)
        _write_atomic(item.output, data)
        out.psnr, out.ssim, out.kept = (out.written.pop(k) for k in ("psnr", "ssim", "kept"))
        out.status, out.faces = PROTECTED, len(item.faces)
    except Exception as e:
        out.status, out.output = FAILED, None
        out.error = str(e) if isinstance(e, (ValueError, OSError)) else f"{item.source}: {e!r}"
    return out


class _Pipeline:
    """Photos flow analyse (threads) -> protect (batched across photos, this thread) -> finish
    (threads), a bounded number of jobs ahead; analyses are taken and outcomes reported in
    input order, so batches and outputs follow it."""

    def __init__(self, pool: cf.ThreadPoolExecutor, n: int, analyse, finish, protect_batch,
                 options: PhotoOptions, on_result):
        self.pool, self.n, self.analyse, self.finish = pool, n, analyse, finish
        self.protect_batch, self.on_result = protect_batch, on_result
        self.batch_size = options.batch_size
        self.lookahead = max(2 * options.batch_size, 2 * options.workers)
        self.outcomes: list[Outcome | None] = [None] * n
        self.analysing: dict[int, cf.Future] = {}     # job index -> future _Analysed
        self.waiting: list[_Analysed] = []            # analysed, in order; faces not all protected
        self.finishing: dict[int, cf.Future] = {}     # job index -> future Outcome
        self.next_job = self.next_analysed = self.next_report = 0

    def run(self) -> list[Outcome]:
        try:
            while self.next_report < self.n:
                self._submit_ahead()
                self._take_analysed()
                if self._protect_ready():
                    continue
                self._wait()
                self._report_finished()
        finally:
            for future in self.analysing.values():
                future.cancel()
        return self.outcomes

    def _submit_ahead(self) -> None:
        while self.next_job < self.n and self.next_job - self.next_report < self.lookahead:
            self.analysing[self.next_job] = self.pool.submit(self.analyse, self.next_job)
            self.next_job += 1

    def _take_analysed(self) -> None:
        """Analyses done, in input order: photos with faces wait for protection, others finish."""
        while self.next_analysed in self.analysing and self.analysing[self.next_analysed].done():
            item = self.analysing.pop(self.next_analysed).result()
            if item.faces and not item.error:
                self.waiting.append(item)
            else:
                self.finishing[self.next_analysed] = self.pool.submit(self.finish, item)
            self.next_analysed += 1

    def _protect_ready(self) -> bool:
        """One batch of waiting faces, when a full one waits or nothing more is being analysed;
        photos whose faces are all protected go on to finish. True if a batch ran."""
        pending = sum(len(it.faces) - len(it.deltas) for it in self.waiting)
        if not self.waiting or (pending < self.batch_size and self.next_analysed != self.next_job):
            return False
        self.protect_batch(self.waiting)
        for item in [it for it in self.waiting if len(it.deltas) == len(it.faces)]:
            self.finishing[item.index] = self.pool.submit(self.finish, item)
        self.waiting = [it for it in self.waiting if len(it.deltas) < len(it.faces)]
        return True

    def _wait(self) -> None:
        watch = [f for f in (self.analysing.get(self.next_analysed),
                             self.finishing.get(self.next_report)) if f is not None]
        if watch:
            cf.wait(watch, return_when=cf.FIRST_COMPLETED)

    def _report_finished(self) -> None:
        while self.next_report in self.finishing and self.finishing[self.next_report].done():
            self.outcomes[self.next_report] = self.finishing.pop(self.next_report).result()
            if self.on_result:
                self.on_result(self.outcomes[self.next_report])
            self.next_report += 1


def _protect_batch(gen: Generator, waiting: list, batch_size: int, eps: float) -> None:
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
        x_adv = protect.protect(gen, x, eps=eps, max_bucket=max(batch_size, 1))
        deltas = list(x_adv - x)
    except Exception as e:   # say which photos were lost, keep the others going
        for item in owners:
            item.error = item.error or f"{item.source}: protection failed ({e!r})"
            item.deltas = [None] * len(item.faces)
        return
    for item, delta in zip(owners, deltas):
        item.deltas.append(delta)
