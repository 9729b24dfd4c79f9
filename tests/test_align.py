"""Alignment of photos to CelebA-HQ-like crops, landmark masks, robust decoding and the photos
dataset of experiments/prepare.py, on the shared faces (read in place) and files in tmp_path."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib")
pytest.importorskip("face_recognition_models")

from experiments import prepare  # noqa: E402
from idguard_jax.faces.align import (ALIGNED_TEMPLATE_68, OK, analyse_photo,  # noqa: E402
                                     apply_transform)
from idguard_jax.data.cache import open_cache  # noqa: E402
from idguard_jax.faces.detection import FaceAnalyzer  # noqa: E402
from idguard_jax.image_files import list_images, read_rgb  # noqa: E402


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer()


@pytest.fixture(scope="module")
def celebahq_faces(shared_faces_dir, analyzer):
    return [analyse_photo(p, analyzer)[0] for p in list_images(shared_faces_dir)]


def test_template_is_the_mean_of_the_shared_celebahq_landmarks(shared_faces_dir, analyzer):
    points = []
    for path in list_images(shared_faces_dir):
        img = read_rgb(path)
        points.append(analyzer.landmarks68(img, analyzer.detect(img)[0]) / img.shape[1::-1])
    assert len(points) == 36
    np.testing.assert_allclose(np.mean(points, axis=0), ALIGNED_TEMPLATE_68, atol=1e-3)


def test_aligned_faces_stay_nearly_in_place_and_masks_cover_their_parts(celebahq_faces):
    for face in celebahq_faces:
        t = face.transform
        assert face.status == OK and face.image.shape == (256, 256, 3)
        assert 0.85 < np.hypot(t[0, 0], t[1, 0]) < 1.15                 # scale
        assert abs(np.degrees(np.arctan2(t[1, 0], t[0, 0]))) < 6         # rotation
        assert np.abs(apply_transform(t, [[128, 128]]) - 128).max() < 8  # centre offset, px
        comp, whole = face.component_mask[..., 0], face.face_mask[..., 0]
        assert set(np.unique(comp)) == {0, 1} and set(np.unique(whole)) == {0, 1}
        x, y = np.clip(np.rint(face.landmarks68).astype(int), 0, 255).T
        assert comp[y[36:48], x[36:48]].all() and comp[y[48:68], x[48:68]].all()
        assert not (comp & ~whole.astype(bool)).any()
        assert 0.03 < comp.mean() < 0.15 and 0.15 < whole.mean() < 0.45
        assert np.all((face.landmarks5 > 0.2) & (face.landmarks5 < 0.8))


def test_every_face_of_a_photo_is_found(shared_photos_dir, analyzer):
    couple = analyse_photo(os.path.join(shared_photos_dir, "couple.jpg"), analyzer)
    assert [f.status for f in couple] == [OK, OK]
    assert len(analyse_photo(os.path.join(shared_photos_dir, "img1.jpg"), analyzer)) == 1
    tiny = analyse_photo(os.path.join(shared_photos_dir, "img1.jpg"), analyzer, min_face=1000)
    assert [f.status for f in tiny] == ["too small"]


def test_an_exif_rotated_photo_aligns_to_the_same_crop(shared_photos_dir, analyzer, tmp_path):
    src = os.path.join(shared_photos_dir, "img1.jpg")
    with Image.open(src) as im:
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": store it turned the other way
        im.convert("RGB").rotate(90, expand=True).save(tmp_path / "turned.png", exif=exif)
    (upright,), (turned,) = (analyse_photo(p, analyzer) for p in (src, tmp_path / "turned.png"))
    np.testing.assert_allclose(turned.landmarks5, upright.landmarks5, atol=0.01)
    assert np.abs(turned.image.astype(int) - upright.image).mean() < 6


def test_read_rgb_decodes_unusual_modes(tmp_path):
    def roundtrip(im, name, **kw):
        im.save(tmp_path / name, **kw)
        return read_rgb(tmp_path / name)

    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    assert np.array_equal(roundtrip(Image.fromarray(grey), "l.png"),
                          np.repeat(grey[..., None], 3, -1))
    pal = Image.fromarray(grey).convert("P")
    assert np.array_equal(roundtrip(pal, "p.png"), np.asarray(pal.convert("RGB")))
    cmyk = roundtrip(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "cmyk.tif")
    assert np.array_equal(cmyk[0, 0], [255, 0, 0])  # no cyan, full magenta and yellow: red
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0], rgba[:, :4, 3] = 255, 255        # left half opaque red, right half transparent
    out = roundtrip(Image.fromarray(rgba, "RGBA"), "rgba.png")
    assert np.array_equal(out[0, 0], [255, 0, 0]) and np.array_equal(out[0, 7], [255, 255, 255])
    deep = np.array([[0, 257, 32896, 65535]], np.uint16)
    for mode, name in (("I;16", "i16.png"), ("I;16", "i16.tif"), ("I", "i32.tif")):
        im = Image.fromarray(deep.astype(np.int32) if mode == "I" else deep)
        assert im.mode == mode
        assert np.array_equal(roundtrip(im, name)[0, :, 0], [0, 1, 128, 255]), (mode, name)
    assert np.array_equal(roundtrip(Image.fromarray(deep.astype(np.float32) / 65535), "f.tif")
                          [0, :, 0], [0, 1, 128, 255])
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.jpg"):
        read_rgb(tmp_path / "cut.jpg")


def test_prepare_photos_reports_every_failure_and_caches_every_face(shared_photos_dir, tmp_path,
                                                                   capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("couple.jpg", "img1.jpg", "img4.jpg"):  # 2 + 1 + 1 faces
        shutil.copy(os.path.join(shared_photos_dir, name), photos / name)
    (photos / "notes.txt").write_text("not an image")
    data = (photos / "img4.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[:len(data) // 3])
    Image.new("RGB", (200, 200), (128, 128, 128)).save(photos / "grey.png")
    cache = tmp_path / "cache"
    argv = ["photos", str(photos), str(cache), "--size", "64", "--labels", "0,1,0,0,1"]

    assert prepare.main(argv) == 1
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["photos"], summary["faces"], summary["done"], summary["failed"]) == (5, 4, 4, 0)
    assert (summary["unreadable"], summary["no_face"], summary["not_images"]) == (
        ["truncated.jpg"], ["grey.png"], ["notes.txt"])
    for name in ("truncated.jpg", "grey.png", "notes.txt"):
        assert name in err

    faces = open_cache(str(cache))
    assert faces.names == ["couple.jpg#0", "couple.jpg#1", "img1.jpg#0", "img4.jpg#0"]
    assert faces.landmarks.shape == (4, 5, 2) and np.isfinite(faces.landmarks).all()
    assert np.array_equal(faces.labels[:], np.tile([0, 1, 0, 0, 1], (4, 1)))
    whole = np.load(cache / "facemasks.u8.npy")
    assert whole.shape == (4, 64, 64, 1) and (whole >= faces.masks[:]).all()
    assert all(0 < m.mean() < 0.2 for m in faces.masks[:])

    assert prepare.main(argv) == 1  # resumed: nothing redone, the same failures reported
    summary = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
    assert summary["skipped_already_done"] == 4
