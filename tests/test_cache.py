"""CelebAMask-HQ reading, the cache (resumable, failures by name) and the prefetching loader,
on a synthetic tree in the official layout (the real dataset may not be redistributed)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from idguard_jax.data import celebamask
from idguard_jax.data.cache import open_cache
from idguard_jax.data.loader import prefetch
from idguard_jax.data.loader import BatchSampler, batch_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTRS = ["5_o_Clock_Shadow", "Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young", "Smiling"]


@pytest.fixture()
def tree(tmp_path):
    """1004 attribute rows (rows 0-999 = test); images and masks only for the 4 train rows."""
    root = tmp_path / "CelebAMask-HQ"
    (root / "CelebA-HQ-img").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    for i in range(1004):
        vals = rng.choice(["1", "-1"], len(ATTRS))
        rows.append(f"{i}.jpg " + " ".join(vals))
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text(
        "1004\n" + " ".join(ATTRS) + "\n" + "\n".join(rows) + "\n")
    for i in range(1000, 1004):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            root / "CelebA-HQ-img" / f"{i}.jpg")
        folder = root / "CelebAMask-HQ-mask-anno" / str(i // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        nose = np.zeros((64, 64), np.uint8)
        nose[20:40, 24:40] = 255          # 2x2 blocks fully inside -> 1
        nose[41, 24:40] = 255             # one row of a block (area 0.5) -> 1
        Image.fromarray(nose).save(folder / f"{i:05d}_nose.png")
        eye = np.zeros((64, 64), np.uint8)
        eye[10, 10] = 255                 # a quarter of a block -> 0
        Image.fromarray(eye).save(folder / f"{i:05d}_l_eye.png")
    (root / "CelebA-HQ-img" / "1003.jpg").write_bytes(b"truncated")   # one bad image
    return root, rows


def test_split_labels_and_mask(tree):
    root, rows = tree
    train = celebamask.read_attributes(str(root), "train")
    assert [r.name for r in train] == ["1000.jpg", "1001.jpg", "1002.jpg", "1003.jpg"]
    assert len(celebamask.read_attributes(str(root), "test")) == 1000
    vals = rows[1000].split()[1:]
    want = [1.0 if vals[ATTRS.index(a)] == "1" else 0.0
            for a in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young")]
    assert list(train[0].labels) == want
    m = celebamask.component_mask(str(root), 1000, size=32)
    assert m.shape == (32, 32, 1) and set(np.unique(m)) <= {0, 1}
    assert m[10:20, 12:20].all() and m[20, 12:20].all()     # area 0.5 row kept
    assert m[5, 5] == 0 and m.sum() == 11 * 8
    with pytest.raises(FileNotFoundError, match="CelebA-HQ-img"):
        celebamask.check_layout(str(root.parent))


def _prepare(*args):
    return subprocess.run([sys.executable, "experiments/prepare.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_prepare_resumes_and_reports_bad_images(tree, tmp_path):
    root, _ = tree
    cache = tmp_path / "cache"
    r = _prepare("celebamask-hq", root, cache, "--size", 32)
    assert r.returncode == 1, r.stderr                 # one image failed: reported, pass went on
    assert "1003.jpg" in r.stderr
    counts = json.loads(r.stdout)
    assert counts["done"] == 3 and counts["failed"] == 1
    data = open_cache(str(cache))
    assert len(data) == 3 and data.names == ["1000.jpg", "1001.jpg", "1002.jpg"]
    b = batch_at(data, np.array([0, 2]))
    assert b["image"].shape == (2, 32, 32, 3) and b["mask"].shape == (2, 32, 32, 1)
    # fix the bad image and re-run: only it is processed
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "CelebA-HQ-img" / "1003.jpg")
    r = _prepare("celebamask-hq", root, cache, "--size", 32)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)
    assert counts == {"cache": str(cache), "done": 4, "failed": 0, "skipped_already_done": 3}
    assert len(open_cache(str(cache))) == 4
    r = _prepare("celebamask-hq", root, cache, "--size", 64)
    assert r.returncode == 2 and "another" in r.stderr


def test_prefetch_yields_the_samplers_batches(shared_faces_dir, tmp_path):
    r = _prepare("aligned", shared_faces_dir, tmp_path / "c", "--size", 32)
    assert r.returncode == 0, r.stderr
    data = open_cache(str(tmp_path / "c"))
    assert len(data) == 36 and "stand-in" in " ".join(data.notes)
    sampler = BatchSampler(len(data), 8, seed=3)
    got = list(prefetch(data, sampler, 2, 7))
    assert len(got) == 5
    for step, b in zip(range(2, 7), got):
        np.testing.assert_array_equal(b["image"], batch_at(data, sampler.indices(step))["image"])


def test_landmarks_for_the_dlib_identity_network(shared_faces_dir, tmp_path):
    r = _prepare("aligned", shared_faces_dir, tmp_path / "c", "--size", 32, "--landmarks")
    assert r.returncode == 0, r.stderr
    data = open_cache(str(tmp_path / "c"))
    assert data.landmarks.shape == (36, 5, 2)
    assert np.all((data.landmarks > 0.1) & (data.landmarks < 0.9))   # aligned faces: central
    b = batch_at(data, np.array([0, 1]))
    assert b["chip_warp"].affine.shape == (2, 2, 3)


def test_heatmaps_go_into_the_cache_resumably(shared_faces_dir, tmp_path):
    from idguard_jax.data.cache import write_heatmaps
    r = _prepare("aligned", shared_faces_dir, tmp_path / "c", "--size", 32)
    assert r.returncode == 0, r.stderr
    cache = str(tmp_path / "c")
    assert open_cache(cache).heatmaps is None

    def fake_cam(images_u8):           # any per-image function stands in for Grad-CAM++ here
        return images_u8[..., :1].astype(np.float32) / 255

    calls = []

    def interrupted(images_u8):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return fake_cam(images_u8)

    with pytest.raises(KeyboardInterrupt):
        write_heatmaps(cache, interrupted, batch_size=8, progress=False)
    assert open_cache(cache).heatmaps is None          # incomplete: not used
    assert write_heatmaps(cache, fake_cam, batch_size=8, progress=False) == (28, 8)
    data = open_cache(cache)
    b = batch_at(data, np.array([3, 30]))
    np.testing.assert_allclose(b["heatmap"], fake_cam(b["image"]), atol=1e-7)
