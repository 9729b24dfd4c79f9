"""A folder's dlib landmarks are found once, kept in a cache file the caller names, and reused
while the files are unchanged; landmark masks are the 68 landmarks' component hulls."""
import os
import shutil

import numpy as np
import pytest

from idguard_jax.data import datasets, folder_landmarks
from idguard_jax.faces.align import ALIGNED_TEMPLATE_68, component_mask_from_landmarks


@pytest.fixture
def three_faces(tmp_path, shared_faces_dir):
    folder = tmp_path / "faces"
    folder.mkdir()
    for name in sorted(os.listdir(shared_faces_dir))[:3]:
        shutil.copy(os.path.join(shared_faces_dir, name), folder / name)
    return folder


def _no_detection(paths):
    raise AssertionError("landmarks were found again instead of read from the cache")


def test_landmarks_are_cached_and_reused_until_a_file_changes(three_faces, tmp_path,
                                                              monkeypatch):
    paths = [str(p) for p in sorted(three_faces.iterdir())]
    cache = tmp_path / "run" / folder_landmarks.LANDMARKS_FILE
    lines = []
    five, sixty_eight = folder_landmarks.cached_landmarks(paths, cache, log=lines.append)
    assert five.shape == (3, 5, 2) and sixty_eight.shape == (3, 68, 2)
    # aligned CelebA-HQ faces: near the mean landmarks of such faces, in unit coordinates
    assert np.abs(sixty_eight - ALIGNED_TEMPLATE_68).mean() < 0.03
    assert cache.is_file() and "cached in" in lines[-1]
    real_find = folder_landmarks.find_landmarks
    monkeypatch.setattr(folder_landmarks, "find_landmarks", _no_detection)
    again = folder_landmarks.cached_landmarks(paths, cache, log=lines.append)
    np.testing.assert_array_equal(again[1], sixty_eight)
    assert "read from" in lines[-1]
    # a changed file (another mtime) is found again
    os.utime(paths[1], ns=(1, 1))
    with pytest.raises(AssertionError, match="found again"):
        folder_landmarks.cached_landmarks(paths, cache)
    monkeypatch.setattr(folder_landmarks, "find_landmarks", real_find)
    np.testing.assert_array_equal(folder_landmarks.cached_landmarks(paths, cache)[0], five)


def test_folder_dataset_with_landmark_masks(three_faces, tmp_path):
    cache = tmp_path / "run" / folder_landmarks.LANDMARKS_FILE
    before = sorted(os.listdir(three_faces))
    faces = datasets.folder_dataset(three_faces, 64, landmarks=True, masks="landmarks",
                                    landmark_cache=cache)
    assert sorted(os.listdir(three_faces)) == before     # nothing written beside the faces
    _, sixty_eight = folder_landmarks.cached_landmarks(
        [str(p) for p in sorted(three_faces.iterdir())], cache)
    for mask, pts in zip(faces.masks, sixty_eight):
        np.testing.assert_array_equal(mask, component_mask_from_landmarks(pts * 64, 64))
    box = datasets.central_face_mask(64).astype(np.uint8)
    assert faces.masks.dtype == np.uint8 and set(np.unique(faces.masks)) == {0, 1}
    assert all(0.05 < m.mean() < 0.5 and not np.array_equal(m, box) for m in faces.masks)
    assert faces.landmarks.shape == (3, 5, 2)
    assert "68 landmarks" in faces.notes[0]
    with pytest.raises(ValueError, match="masks='nose'"):
        datasets.folder_dataset(three_faces, 64, masks="nose")
