"""Protecting ordinary photos (idguard protect): formats, orientation, metadata, bounds, bad
files, resume, and that no input is ever modified."""
import hashlib
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import save_bounded_generator
from experiments import protect as cli
from idguard_jax.protection import photos
from idguard_jax.protection import faces as protect
from idguard_jax.protection.photo_io import orient, read_photo, unorient

pytest.importorskip("dlib")
EPS_LEVELS = int(0.05 * 127.5)   # 6 grey levels


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    """A tiny generator (64 px frame) whose perturbation reaches the eps bound."""
    return save_bounded_generator(tmp_path_factory.mktemp("gen") / "generator", 64)


@pytest.fixture(scope="module")
def photos_dir(shared_photos_dir):
    return pathlib.Path(shared_photos_dir)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _exif(orientation=None, description=None):
    ex = Image.Exif()
    if orientation:
        ex[0x0112] = orientation
    if description:
        ex[0x010E] = description
    return ex.tobytes()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photos_dir):
    """A folder of every kind of input: JPEG (one with two faces, one EXIF-rotated with a
    description), grey PNG with a text chunk, RGBA PNG, WebP, a photo without a face, a truncated
    JPEG, and a text file named .jpg."""
    d = tmp_path_factory.mktemp("inputs")
    src = str(photos_dir)
    shutil.copy(os.path.join(src, "couple.jpg"), d / "couple.jpg")
    shutil.copy(os.path.join(src, "img1.jpg"), d / "img1.jpg")
    upright = np.asarray(Image.open(os.path.join(src, "img2.jpg")).convert("RGB"))
    Image.fromarray(unorient(upright, 6)).save(
        d / "rotated.jpg", quality=95, exif=_exif(6, "holiday"))
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "me")
    Image.open(os.path.join(src, "img3.jpg")).convert("L").save(d / "grey.png", pnginfo=info)
    rgba = Image.open(os.path.join(src, "img4.jpg")).convert("RGBA")
    alpha = np.tile(np.linspace(80, 255, rgba.size[0]).astype(np.uint8), (rgba.size[1], 1))
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(d / "alpha.png")
    Image.open(os.path.join(src, "img5.jpg")).save(d / "photo.webp", quality=90)
    gradient = np.linspace(0, 255, 300 * 200 * 3).reshape(200, 300, 3).astype(np.uint8)
    Image.fromarray(gradient).save(d / "noface.png")
    data = open(os.path.join(src, "img6.jpg"), "rb").read()
    (d / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    (d / "fake.jpg").write_text("not an image")
    return d


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_folder_of_every_kind(inputs, generator_dir, tmp_path, capsys, photos_dir):
    before = {p: _sha(p) for p in list(inputs.iterdir()) + list(photos_dir.iterdir())}
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    out, report = tmp_path / "out", tmp_path / "report.json"
    rc, stdout, _ = _run(capsys, inputs, notes, "--out", out, "--generator", generator_dir,
                         "--report", report)
    assert rc == 1                                  # three inputs failed; the rest went on
    rows = {os.path.basename(r["source"]): r for r in json.load(open(report))["photos"]}
    assert {k for k, r in rows.items() if r["status"] == photos.FAILED} == {
        "corrupt.jpg", "fake.jpg", "notes.txt"}
    for name in ("corrupt.jpg", "fake.jpg", "notes.txt"):
        assert name in rows[name]["error"] and f"FAILED {rows[name]['error']}" in stdout
    assert rows["noface.png"]["status"] == photos.NO_FACE and not (out / "noface.png").exists()
    assert "noface.png" in stdout
    protected = {k for k, r in rows.items() if r["status"] == photos.PROTECTED}
    assert protected == {"couple.jpg", "img1.jpg", "rotated.jpg", "grey.png", "alpha.png",
                         "photo.webp"}
    assert rows["couple.jpg"]["faces"] == 2
    for name in protected:
        a, b = Image.open(inputs / name), Image.open(out / name)
        assert (b.format, b.size, b.mode) == (a.format, a.size, a.mode), name
        assert 30 < rows[name]["psnr"] < 60 and 0.8 < rows[name]["ssim"] < 1, name
    # orientation and metadata kept
    exif = Image.open(out / "rotated.jpg").getexif()
    assert exif[0x0112] == 6 and exif[0x010E] == "holiday"
    assert Image.open(out / "grey.png").text["Author"] == "me"
    # lossless outputs: every value within the budget, alpha untouched, something changed
    for name in ("grey.png", "alpha.png", "photo.webp"):
        a, b = read_photo(inputs / name).stored, read_photo(out / name).stored
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= EPS_LEVELS and diff.max() > 0, name
        assert rows[name]["kept"] == 1.0
    a, b = read_photo(inputs / "alpha.png").stored, read_photo(out / "alpha.png").stored
    np.testing.assert_array_equal(a[..., 3], b[..., 3])
    # JPEG: quality chosen per photo and said
    assert rows["img1.jpg"]["written"]["quality"] in photos.JPEG_QUALITIES
    assert "JPEG quality" in stdout
    # nothing we were given changed
    assert {p: _sha(p) for p in before} == before


def test_bound_at_full_resolution_and_exif_rotation(photos_dir, generator_dir, tmp_path,
                                                     capsys):
    """The same picture stored upright and stored rotated with EXIF orientation 6 gets the same
    protection (in the displayed frame); every value moves by at most 6 grey levels."""
    src = tmp_path / "in"
    src.mkdir()
    upright = np.asarray(Image.open(photos_dir / "couple.jpg").convert("RGB"))
    Image.fromarray(upright).save(src / "upright.png")
    Image.fromarray(unorient(upright, 6)).save(src / "rotated.png", exif=_exif(6))
    rc, _, _ = _run(capsys, src, "--out", tmp_path / "out", "--generator", generator_dir, "--png")
    assert rc == 0
    up = read_photo(tmp_path / "out" / "upright.png").stored
    rot = read_photo(tmp_path / "out" / "rotated.png")
    assert rot.orientation == 6 and rot.stored.shape == unorient(upright, 6).shape
    np.testing.assert_array_equal(orient(rot.stored, 6), up)
    diff = np.abs(up.astype(int) - upright.astype(int))
    assert diff.max() == EPS_LEVELS
    changed = diff.max(-1) > 0
    assert 0.05 < changed.mean() < 0.9          # around the two faces, not the whole photo


def test_no_face_copy_and_lower_eps(inputs, generator_dir, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(inputs / "noface.png", src)
    shutil.copy(inputs / "grey.png", src)
    rc, stdout, _ = _run(capsys, src, "--out", tmp_path / "out", "--generator", generator_dir,
                         "--no-face", "copy", "--eps", "0.02")
    assert rc == 0 and "copied unchanged" in stdout
    np.testing.assert_array_equal(read_photo(tmp_path / "out" / "noface.png").stored,
                                  read_photo(src / "noface.png").stored)
    diff = np.abs(read_photo(tmp_path / "out" / "grey.png").stored.astype(int)
                  - read_photo(src / "grey.png").stored.astype(int))
    assert diff.max() == int(0.02 * 127.5)


def test_resume_after_an_interruption(photos_dir, generator_dir, tmp_path, capsys):
    names = [f"img{i}.jpg" for i in range(7, 17)]
    jobs = [(str(photos_dir / n), str(tmp_path / "out" / n)) for n in names]

    def interrupt(outcome):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        photos.protect_photos(protect.load(generator_dir), jobs, photos.PhotoOptions(batch_size=1),
                              on_result=interrupt)
    done = {n: _sha(tmp_path / "out" / n) for n in names if (tmp_path / "out" / n).exists()}
    assert "img7.jpg" in done and len(done) < len(names)
    # a temporary file an interrupted run could leave behind
    stale = tmp_path / "out" / f".img16.jpg{photos.TMP_MARK}-99999"
    stale.write_bytes(b"partial")
    args = [*(str(photos_dir / n) for n in names), "--out", tmp_path / "out",
            "--generator", generator_dir]
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and "exist already" in err and "--resume" in err
    rc, stdout, _ = _run(capsys, *args, "--resume")
    assert rc == 0 and f"{len(done)} already done" in stdout
    assert all((tmp_path / "out" / n).exists() for n in names) and not stale.exists()
    assert {n: _sha(tmp_path / "out" / n) for n in done} == done    # finished ones untouched
    rc, _, _ = _run(capsys, *args, "--overwrite")
    assert rc == 0


def _unwritable_folder(tmp_path):
    """A folder this process cannot write into: chmod 555, or (as root, which ignores modes)
    a sysfs folder, where no one can create files."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    for candidate in (ro, "/sys/kernel"):
        try:
            open(os.path.join(candidate, ".probe"), "wb").close()
            os.remove(os.path.join(candidate, ".probe"))
        except OSError:
            return str(candidate)
    pytest.skip("no unwritable folder on this machine")


def test_bad_arguments_exit_2_and_write_nothing(photos_dir, generator_dir, tmp_path,
                                                capsys):
    photo = photos_dir / "img1.jpg"
    out = tmp_path / "out"
    cases = [
        (["--eps", "2"], "--eps"),
        (["--jpeg-quality", "0"], "--jpeg-quality"),
        (["--resume", "--overwrite"], "contradict"),
        ([str(tmp_path / "missing.jpg")], "missing.jpg: no such file"),
    ]
    for extra, message in cases:
        rc, _, err = _run(capsys, photo, "--out", out, "--generator", generator_dir, *extra)
        assert rc == 2 and message in err, (extra, err)
    rc, _, err = _run(capsys, photo, "--out", out, "--generator", tmp_path / "nope")
    assert rc == 2 and "--generator" in err and "nope" in err
    assert not out.exists() or not os.listdir(out)
    # an output that would be an input
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(photo, src)
    rc, _, err = _run(capsys, src, "--out", src, "--generator", generator_dir)
    assert rc == 2 and "would overwrite an input" in err
    readonly = _unwritable_folder(tmp_path)
    rc, _, err = _run(capsys, photo, "--out", readonly, "--generator", generator_dir)
    assert rc == 2 and f"--out {readonly}: cannot write" in err


def test_perturbation_is_warped_back_and_clipped():
    """Two overlapping faces' perturbations add, then clip at eps; bilinear resampling never
    exceeds the largest input value."""
    size, eps = 32, 0.05
    delta = np.full((size, size, 3), eps, np.float32)
    shift = np.array([[1.0, 0, 0], [0, 1, 0]])        # crop = the photo's top-left 32x32
    total = photos.perturbation_for_photo([delta, delta], [shift, shift], (48, 40), eps)
    assert total.shape == (48, 40, 3)
    np.testing.assert_allclose(total[:31, :31], eps)  # clipped, not 2 * eps
    assert np.all(total[40:] == 0) and np.all(total[:, 36:] == 0)
    half = np.array([[0.5, 0, 0], [0, 0.5, 0]])       # the face twice as large in the photo
    r = np.random.default_rng(0).uniform(-eps, eps, (size, size, 3)).astype(np.float32)
    big = photos.perturbation_for_photo([r], [half], (64, 64), eps)
    assert np.abs(big).max() <= np.abs(r).max() + 1e-7 and np.abs(big[:60, :60]).min() >= 0


def test_verify_shows_what_targets_make_of_both(photos_dir, generator_dir, tmp_path, capsys):
    from experiments import verify

    original = photos_dir / "couple.jpg"
    rc, _, _ = _run(capsys, original, "--out", tmp_path / "out", "--generator", generator_dir,
                    "--png")
    assert rc == 0
    protected = tmp_path / "out" / "couple.png"
    common = ["--random-targets", "tiny", "--targets", "stargan,hisd", "--all-faces"]
    rc = verify.main([str(original), str(protected), *common, "--out", str(tmp_path / "g.png"),
                      "--json", str(tmp_path / "v.json")])
    stdout = capsys.readouterr().out
    assert rc == 0 and "RANDOM stand-ins" in stdout and "descriptor distance >= 0.6" in stdout
    rows = json.load(open(tmp_path / "v.json"))["rows"]
    assert {(r["target"], r["face"]) for r in rows} == {(t, f) for t in ("stargan", "hisd")
                                                        for f in (0, 1)}
    assert all(r["l2_face"] > 1e-4 for r in rows)        # the protection changed every output
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape[1] == 4 * 64 + 3 * 2 and grid.shape[0] == len(rows) * 66 - 2
    # the original against itself: nothing changes, nothing succeeds
    rc = verify.main([str(original), str(original), *common, "--json", str(tmp_path / "s.json")])
    same = json.load(open(tmp_path / "s.json"))["rows"]
    assert rc == 0 and all(r["l2_face"] == 0 and not r["success"] for r in same)
    assert all(r["identity"] < 1e-6 for r in same)      # dlib distance of identical faces
    capsys.readouterr()
    # bad input: a different photo size, no targets given
    rc = verify.main([str(original), str(photos_dir / "img1.jpg"), *common])
    assert rc == 2 and "not the same photo" in capsys.readouterr().err
    rc = verify.main([str(original), str(protected)])
    assert rc == 2 and "--weights" in capsys.readouterr().err


def test_a_phone_multi_picture_jpeg_is_read_as_jpeg(photos_dir, tmp_path):
    first = Image.open(photos_dir / "img1.jpg").convert("RGB")
    path = tmp_path / "phone.jpg"
    first.save(path, format="MPO", save_all=True, append_images=[first.rotate(90)])
    assert Image.open(path).format == "MPO"
    photo = read_photo(path)
    assert photo.format == "JPEG" and photo.stored.shape == (first.height, first.width, 3)
