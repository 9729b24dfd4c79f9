"""The reference code's recipe beside the paper's: its soft JPEG + bilinear masks (against an
independent Pillow implementation, on a synthetic tree in the CelebAMask-HQ layout), the cache
recording and enforcing the mask pipeline, and `config.reference()`."""
import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from idguard_jax import config
from idguard_jax.data import celebamask, prepare
from idguard_jax.data.cache import open_cache
from idguard_jax.data.loader import BatchSampler, batch_at
from test_cache import tree  # noqa: F401  (the synthetic CelebAMask-HQ tree fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS_1000 = ("l_brow", "nose", "l_eye")   # the parts the tree (and faint_brow) give row 1000


@pytest.fixture()
def faint_brow(tree):  # noqa: F811
    """Row 1000 also gets an l_brow part of grey level 60: > 0 (the reference's threshold) but not
    > 127 (the exact pipeline's)."""
    root, _ = tree
    brow = np.zeros((64, 64), np.uint8)
    brow[4:8, 30:50] = 60
    Image.fromarray(brow).save(root / "CelebAMask-HQ-mask-anno" / "0" / "01000_l_brow.png")
    return root


def _independent_reference_mask(root, index: int, size: int) -> np.ndarray:
    """The reference's steps, one by one, with Pillow: union of parts > 0 as {0, 255} (its
    process_dataset.py), a greyscale JPEG at quality 95 (cv2.imwrite's default), read back as
    RGB and resized with BILINEAR (its dataset.py: Image.open(...).convert('RGB'), T.Resize)."""
    union = np.zeros((64, 64), bool)
    for part in PARTS_1000:
        path = os.path.join(root, "CelebAMask-HQ-mask-anno", "0", f"{index:05d}_{part}.png")
        union |= np.array(Image.open(path).convert("L")) > 0
    grey = Image.fromarray(np.where(union, 255, 0).astype(np.uint8))
    jpeg = io.BytesIO()
    grey.save(jpeg, format="JPEG", quality=95)
    decoded = Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB")
    resized = np.array(decoded.resize((size, size), resample=Image.Resampling.BILINEAR))
    assert (resized[..., 0] == resized[..., 1]).all() and (resized[..., 1] == resized[..., 2]).all()
    return resized[..., :1]


def test_reference_masks_match_an_independent_pillow_pipeline(faint_brow):
    got = celebamask.component_mask(str(faint_brow), 1000, size=32, pipeline="reference")
    want = _independent_reference_mask(faint_brow, 1000, 32)
    assert got.shape == (32, 32, 1) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    soft = np.unique(got)
    assert len(soft) > 2 and soft.max() >= 250            # soft edges, a full interior
    assert got[3, 20:24].max() > 0                         # the faint brow is in (> 0)
    exact = celebamask.component_mask(str(faint_brow), 1000, size=32)
    assert exact[:5, 15:25].max() == 0                      # ... and not in the exact mask (> 127)
    # no part file at all: zeros, in either pipeline
    assert not celebamask.component_mask(str(faint_brow), 999, 32, "reference").any()
    with pytest.raises(ValueError, match="'exact', 'reference'|exact, reference"):
        celebamask.component_mask(str(faint_brow), 1000, 32, "soft")


def test_the_exact_pipeline_is_unchanged(faint_brow):
    """The default masks: parts > 127, 2x2 area mean >= 0.5, uint8 {0, 1}, passed to the step
    as the uint8 they are stored as."""
    union = np.zeros((64, 64), bool)
    for part in PARTS_1000:
        path = faint_brow / "CelebAMask-HQ-mask-anno" / "0" / f"01000_{part}.png"
        union |= np.array(Image.open(path).convert("L")) > 127
    want = (union.reshape(32, 2, 32, 2).mean(axis=(1, 3)) >= 0.5).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(celebamask.component_mask(str(faint_brow), 1000, 32), want)
    np.testing.assert_array_equal(celebamask.component_mask(str(faint_brow), 1000, 32, "exact"),
                                  want)


def test_cache_records_the_pipeline_and_the_step_sees_unit_masks(faint_brow, tmp_path):
    for pipeline in celebamask.MASK_PIPELINES:
        cache = str(tmp_path / pipeline)
        counts = prepare.prepare_celebamask(str(faint_brow), cache, size=32, masks=pipeline,
                                            log=lambda line: None)
        assert counts["done"] == 3                        # 1003.jpg is the tree's bad image
        with open(os.path.join(cache, "meta.json")) as f:
            assert json.load(f)["mask_pipeline"] == pipeline
        data = open_cache(cache, mask_pipeline=pipeline)
        assert data.mask_pipeline == pipeline
        stored = celebamask.component_mask(str(faint_brow), 1000, 32, pipeline)
        np.testing.assert_array_equal(data.masks[data.rows[0]], stored)
        mask = batch_at(data, np.array([0, 1]))["mask"]
        if pipeline == "exact":                           # as before: the stored uint8 {0, 1}
            assert mask.dtype == np.uint8
            np.testing.assert_array_equal(mask[0], stored)
        else:
            assert mask.dtype == np.float32
            np.testing.assert_allclose(mask[0], stored / 255.0, rtol=1e-6)
        assert 0 <= mask.min() and mask.max() == 1


def test_a_cache_of_the_other_pipeline_is_refused(tree, tmp_path):  # noqa: F811
    root, _ = tree
    ref = str(tmp_path / "ref")
    prepare.prepare_celebamask(str(root), ref, size=32, masks="reference", log=lambda line: None)
    with pytest.raises(ValueError, match=r"ref: holds masks of the 'reference' pipeline, but "
                                         r"the 'exact' pipeline"):
        open_cache(ref, mask_pipeline="exact")
    assert open_cache(ref).mask_pipeline == "reference"   # None accepts either
    # resuming with the other pipeline: refused, nothing overwritten
    before = np.load(os.path.join(ref, "masks.u8.npy")).copy()
    with pytest.raises(FileExistsError, match="'reference' pipeline, not 'exact'"):
        prepare.prepare_celebamask(str(root), ref, size=32, log=lambda line: None)
    np.testing.assert_array_equal(np.load(os.path.join(ref, "masks.u8.npy")), before)
    # a cache from before the key holds exact masks
    exact = str(tmp_path / "exact")
    prepare.prepare_celebamask(str(root), exact, size=32, log=lambda line: None)
    meta_path = os.path.join(exact, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["mask_pipeline"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert open_cache(exact, mask_pipeline="exact").mask_pipeline == "exact"
    with pytest.raises(ValueError, match="'exact' pipeline, but the 'reference'"):
        open_cache(exact, mask_pipeline="reference")


def test_training_refuses_the_other_pipeline(tree, tmp_path, shared_faces_dir):  # noqa: F811
    from experiments import train

    root, _ = tree
    exact = str(tmp_path / "exact")
    prepare.prepare_celebamask(str(root), exact, size=32, log=lambda line: None)
    cfg = config.reference(image_size=32, identity="standin")
    with pytest.raises(ValueError, match=r"--data .*exact: holds masks of the 'exact' pipeline, "
                                         r"but the 'reference'.*--masks reference"):
        train._open_faces(cfg, exact, str(tmp_path / "run"))
    with pytest.raises(ValueError, match="'exact' pipeline, but the 'reference'"):
        train._open_faces(cfg, shared_faces_dir, str(tmp_path / "run"))   # a folder: binary
    faces = train._open_faces(dataclasses.replace(cfg, mask_pipeline="exact"), exact,
                              str(tmp_path / "run"))
    assert len(faces) == 3


def test_prepare_command_masks_option(tree, tmp_path):  # noqa: F811
    root, _ = tree

    def run(*args):
        return subprocess.run([sys.executable, "experiments/prepare.py", *map(str, args)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    r = run("celebamask-hq", root, tmp_path / "c", "--size", 32, "--masks", "reference")
    assert r.returncode == 1 and json.loads(r.stdout)["done"] == 3, r.stderr   # 1003.jpg bad
    assert open_cache(str(tmp_path / "c")).mask_pipeline == "reference"
    r = run("celebamask-hq", root, tmp_path / "c", "--size", 32)
    assert r.returncode == 2 and "'reference' pipeline, not 'exact'" in r.stderr
    r = run("aligned", root / "CelebA-HQ-img", tmp_path / "a", "--masks", "reference")
    assert r.returncode == 2 and "--masks reference: only for celebamask-hq" in r.stderr
    assert not (tmp_path / "a").exists()


def test_reference_config_is_the_released_codes_recipe():
    ref = config.reference()
    assert (ref.batch_size, ref.num_steps, ref.strategy, ref.mask_pipeline) == (
        3, None, "mgda", "reference")
    # everything else as the paper's
    assert dataclasses.replace(ref, batch_size=32, strategy="kpi",
                               mask_pipeline="exact") == config.paper()
    assert config.paper().mask_pipeline == "exact"
    # one epoch of the 29,000 training images: the last partial batch is dropped (9,667 there)
    assert BatchSampler(29000, ref.batch_size, seed=0).steps_per_epoch == 9666
    with pytest.raises(ValueError, match="mask_pipeline='soft'"):
        config.paper(mask_pipeline="soft")
    assert config.apply_overrides(ref, ["mask_pipeline=exact"]).mask_pipeline == "exact"


def test_train_command_takes_the_reference_config():
    from experiments import train

    args = train._parser().parse_args(["--config=reference", "--set", "dtype=bfloat16"])
    cfg = train._config(args)
    assert (cfg.batch_size, cfg.strategy, cfg.mask_pipeline, cfg.dtype) == (
        3, "mgda", "reference", "bfloat16")
    assert train._config(train._parser().parse_args([])).mask_pipeline == "exact"   # paper
