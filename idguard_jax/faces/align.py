"""Face alignment of ordinary photos to CelebA-HQ-like crops, and masks from 68 landmarks.

A photo may hold several faces at any size and angle; ID-Guard's generator and the face-editing
GANs expect CelebA-HQ-like aligned faces. `analyse_photo` finds every face (dlib HOG), fits the
similarity transform (rotation, uniform scale, translation) that takes its 68 dlib landmarks
closest, in the least-squares sense, to `ALIGNED_TEMPLATE_68`, and cuts the aligned crop. The
transform maps original -> aligned pixels, so a perturbation made on the crop can be warped back.

Coordinates: x, y pixel indices (dlib's convention: pixel i has its centre at i); "unit"
coordinates are pixels / image size. Masks are uint8 in {0, 1}, (size, size, 1).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from idguard_jax.image_files import read_rgb

__all__ = ["ALIGNED_TEMPLATE_68", "COMPONENTS", "similarity_transform", "apply_transform",
           "align_face", "cut_aligned", "component_mask_from_landmarks", "face_mask_from_landmarks", "AlignedFace",
           "analyse_photo", "analyse_image", "warp_to_photo", "OK", "TOO_SMALL"]

# Mean dlib 68-point landmarks (x, y) / 256 of the 36 CelebA-HQ faces (256 x 256) in
# shared/data/faces/celebahq: HOG detector (upsample 1), largest face,
# shape_predictor_68_face_landmarks.dat, rounded to 4 decimals (tests/test_align.py re-derives it).
ALIGNED_TEMPLATE_68 = np.array([
    [0.2329, 0.4872], [0.2352, 0.5581], [0.2441, 0.6300], [0.2573, 0.7011], [0.2819, 0.7684],
    [0.3223, 0.8266], [0.3720, 0.8780], [0.4297, 0.9212], [0.4963, 0.9331], [0.5651, 0.9226],
    [0.6277, 0.8814], [0.6840, 0.8328], [0.7295, 0.7747], [0.7576, 0.7074], [0.7717, 0.6338],
    [0.7815, 0.5598], [0.7852, 0.4860],  # jaw 0-16
    [0.2733, 0.4336], [0.3075, 0.4052], [0.3550, 0.3997], [0.4030, 0.4071], [0.4488, 0.4259],
    [0.5421, 0.4236], [0.5922, 0.4042], [0.6420, 0.3965], [0.6913, 0.4033], [0.7285, 0.4303],
    [0.4957, 0.4770], [0.4949, 0.5252], [0.4935, 0.5732], [0.4923, 0.6223], [0.4443, 0.6530],
    [0.4683, 0.6627], [0.4942, 0.6714], [0.5206, 0.6622], [0.5452, 0.6539],  # nose 27-35
    [0.3298, 0.4812], [0.3597, 0.4619], [0.3981, 0.4633], [0.4274, 0.4888], [0.3942, 0.4958],
    [0.3575, 0.4954], [0.5709, 0.4874], [0.6017, 0.4615], [0.6398, 0.4607], [0.6707, 0.4791],
    [0.6431, 0.4936], [0.6064, 0.4942],  # eyes 36-47
    [0.3880, 0.7388], [0.4264, 0.7236], [0.4658, 0.7166], [0.4941, 0.7233], [0.5242, 0.7165],
    [0.5658, 0.7240], [0.6074, 0.7376], [0.5674, 0.7786], [0.5270, 0.7969], [0.4944, 0.8005],
    [0.4632, 0.7976], [0.4247, 0.7796], [0.4055, 0.7418], [0.4656, 0.7408], [0.4945, 0.7437],
    [0.5251, 0.7407], [0.5888, 0.7412], [0.5253, 0.7585], [0.4942, 0.7626], [0.4644, 0.7589],
], np.float64)  # mouth 48-67

# dlib's 68-point index ranges (0-based) of the components the component mask covers.
COMPONENTS = {"r_brow": range(17, 22), "l_brow": range(22, 27), "nose": range(27, 36),
              "r_eye": range(36, 42), "l_eye": range(42, 48), "mouth": range(48, 68)}
JAW, BROWS, EYES = range(0, 17), range(17, 27), range(36, 48)
# Component-mask dilation radius as a fraction of the face width (jaw point 0 to 16): about
# 3 px at 256, enough for an eyebrow's or lip's visible edge beyond the landmark hull.
DILATION = 0.02
# The face mask reaches above each eyebrow landmark by this fraction of the eye-to-brow distance,
# so it covers the whole brow (dlib's brow points run along its middle) but not the forehead.
BROW_LIFT = 0.5
OK, TOO_SMALL = "ok", "too small"


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation + uniform scale + translation, no reflection) taking
    points src (N, 2) to dst (N, 2): the (2, 3) matrix M with dst ~ M @ [x, y, 1]."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    # As complex numbers the best similarity is d = a s + b with a = <s, d> / <s, s>.
    s = (src[:, 0] - mu_s[0]) + 1j * (src[:, 1] - mu_s[1])
    d = (dst[:, 0] - mu_d[0]) + 1j * (dst[:, 1] - mu_d[1])
    a = np.vdot(s, d) / np.vdot(s, s).real
    rot = np.array([[a.real, -a.imag], [a.imag, a.real]])
    return np.concatenate([rot, (mu_d - rot @ mu_s)[:, None]], axis=1)


def apply_transform(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N, 2) mapped by a (2, 3) affine matrix."""
    return np.asarray(points, np.float64) @ transform[:, :2].T + transform[:, 2]


def align_face(image_u8: np.ndarray, landmarks68: np.ndarray, size: int = 256,
               resample=Image.BICUBIC) -> tuple[np.ndarray, np.ndarray]:
    """The face with these 68 landmarks (pixels of `image_u8` (H, W, 3)) cut as a CelebA-HQ-like
    aligned crop: (aligned (size, size, 3) uint8, transform (2, 3) original -> aligned pixels).
    Parts of the crop outside the photo are black."""
    transform = similarity_transform(landmarks68, ALIGNED_TEMPLATE_68 * size)
    return cut_aligned(image_u8, transform, size, resample), transform


def cut_aligned(image_u8: np.ndarray, transform: np.ndarray, size: int,
                resample=Image.BICUBIC) -> np.ndarray:
    """The (size, size, 3) uint8 crop of `image_u8` that `transform` (photo -> aligned pixels)
    defines: e.g. a protected photo cut exactly where its original's face was aligned."""
    inverse = np.linalg.inv(_pil_affine(transform))[:2].ravel()  # PIL wants output -> input
    aligned = Image.fromarray(np.asarray(image_u8, np.uint8)).transform(
        (size, size), Image.AFFINE, tuple(inverse), resample=resample)
    return np.asarray(aligned, np.uint8).copy()


def _pil_affine(transform: np.ndarray) -> np.ndarray:
    """A (2, 3) map between dlib pixel coordinates (pixel i centred at i) as a (3, 3) map between
    PIL's (pixel i centred at i + 0.5)."""
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    return shift @ np.vstack([transform, [0, 0, 1]]) @ np.linalg.inv(shift)


def warp_to_photo(aligned: np.ndarray, transform: np.ndarray,
                  photo_shape: tuple[int, int]) -> np.ndarray:
    """The inverse of `align_face` for float data: `aligned` (S, S, C) float (a perturbation made
    on the aligned crop) resampled bilinearly into the photo's frame (H, W, C) float32, zero
    outside the crop's footprint. `transform` is align_face's (2, 3) photo -> aligned matrix.
    Bilinear weights are convex, so |output| <= max |aligned| everywhere."""
    h, w = photo_shape
    mapping = tuple(_pil_affine(transform)[:2].ravel())  # PIL wants output (photo) -> input
    channels = [Image.fromarray(np.ascontiguousarray(aligned[..., c], np.float32), "F")
                .transform((w, h), Image.AFFINE, mapping, resample=Image.BILINEAR)
                for c in range(aligned.shape[-1])]
    return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)


def _convex_hull(points: np.ndarray) -> list[tuple[float, float]]:
    """Convex hull of points (N, 2), counter-clockwise (Andrew's monotone chain)."""
    pts = sorted(set(map(tuple, np.asarray(points, np.float64).tolist())))
    if len(pts) < 3:
        return pts

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]
    return half(pts) + half(pts[::-1])


def _fill_hulls(groups: list[np.ndarray], size: int) -> Image.Image:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for pts in groups:
        draw.polygon(_convex_hull(pts), fill=1, outline=1)
    return canvas


def _dilated(canvas: Image.Image, pts: np.ndarray) -> np.ndarray:
    """The mask dilated by DILATION x the face width, as (size, size, 1) uint8."""
    radius = max(1, round(DILATION * np.linalg.norm(pts[16] - pts[0])))
    dilated = canvas.filter(ImageFilter.MaxFilter(2 * radius + 1))
    return np.asarray(dilated, np.uint8)[..., None].copy()


def component_mask_from_landmarks(landmarks68_aligned: np.ndarray, size: int) -> np.ndarray:
    """Binary mask (size, size, 1) uint8 of the eyebrows, eyes, nose and mouth: each one's
    filled landmark hull, dilated by DILATION x the face width (landmarks in aligned pixels)."""
    pts = np.asarray(landmarks68_aligned, np.float64)
    return _dilated(_fill_hulls([pts[list(r)] for r in COMPONENTS.values()], size), pts)


def face_mask_from_landmarks(landmarks68_aligned: np.ndarray, size: int) -> np.ndarray:
    """Whole-face mask (size, size, 1) uint8 for L2_face: the filled hull of the jaw line, the
    eyebrows and the eyebrows lifted by BROW_LIFT x the eye-to-brow distance along the face's
    up direction (perpendicular to the eye line), i.e. chin to just above the brows; dilated like
    the component mask, so it holds that mask (whose landmarks lie inside this hull)."""
    pts = np.asarray(landmarks68_aligned, np.float64)
    eye_r, eye_l = pts[36:42].mean(0), pts[42:48].mean(0)
    across = (eye_l - eye_r) / np.linalg.norm(eye_l - eye_r)
    up = np.array([across[1], -across[0]])  # image y points down: rotate the eye line by -90 deg
    brows = pts[list(BROWS)]
    lift = BROW_LIFT * max(0.0, float((brows.mean(0) - pts[list(EYES)].mean(0)) @ up))
    return _dilated(_fill_hulls([np.concatenate([pts[list(JAW)], brows, brows + lift * up])],
                                size), pts)


class AlignedFace(NamedTuple):
    """One face of a photo, aligned. image (S, S, 3) uint8; component_mask and face_mask
    (S, S, 1) uint8 in {0, 1}; landmarks5 (5, 2) dlib 5-point landmarks in aligned unit
    coordinates (what the dlib identity network's chips need); landmarks68 (68, 2) aligned
    pixels; box (4,) l, t, r, b in the photo's pixels; transform (2, 3) photo -> aligned pixels;
    status OK or TOO_SMALL (box narrower than min_face px)."""
    image: np.ndarray
    component_mask: np.ndarray
    face_mask: np.ndarray
    landmarks5: np.ndarray
    landmarks68: np.ndarray
    box: np.ndarray
    transform: np.ndarray
    status: str


def analyse_photo(path: str | os.PathLike, analyzer, size: int = 256,
                  min_face: int = 64) -> list[AlignedFace]:
    """Every face dlib finds in the photo at `path` (largest first), aligned to size x size.
    Raises ValueError naming the file if it cannot be read. See `analyse_image`."""
    return analyse_image(read_rgb(path), analyzer, size, min_face)


def analyse_image(photo: np.ndarray, analyzer, size: int = 256, min_face: int = 64,
                  detect_max_side: int | None = None) -> list[AlignedFace]:
    """Every face dlib finds in `photo` (H, W, 3) uint8 RGB, upright (largest first), aligned to
    size x size.

    `analyzer` is a faces.detection.FaceAnalyzer. Faces whose detection box is narrower than `min_face`
    px are still returned, with status TOO_SMALL (their landmarks are unreliable). An empty list:
    no face. With `detect_max_side`, a larger photo is searched at that size (HOG detection time
    grows with the pixel count) and the boxes scaled back; landmarks use the full resolution.
    """
    scale = 1.0
    search = photo
    if detect_max_side and max(photo.shape[:2]) > detect_max_side:
        scale = detect_max_side / max(photo.shape[:2])
        h, w = round(photo.shape[0] * scale), round(photo.shape[1] * scale)
        search = np.asarray(Image.fromarray(photo).resize((w, h), Image.BILINEAR))
    boxes = analyzer.detect(search)
    if scale != 1.0:
        boxes = np.rint(boxes / scale).astype(np.int64)
    faces = []
    for box in boxes:
        pts68 = analyzer.landmarks68(photo, box)
        aligned, transform = align_face(photo, pts68, size)
        pts68_aligned = apply_transform(transform, pts68)
        # the 5-point model on the photo, mapped: the same points dlib would find on the crop,
        # without a second detection that could miss
        pts5_aligned = apply_transform(transform, analyzer.landmarks(photo, box))
        width = int(box[2] - box[0] + 1)
        faces.append(AlignedFace(
            image=aligned, component_mask=component_mask_from_landmarks(pts68_aligned, size),
            face_mask=face_mask_from_landmarks(pts68_aligned, size),
            landmarks5=(pts5_aligned / size).astype(np.float32), landmarks68=pts68_aligned,
            box=np.asarray(box), transform=transform,
            status=OK if width >= min_face else TOO_SMALL))
    return faces
