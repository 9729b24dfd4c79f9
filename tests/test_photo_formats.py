"""idguard protect on every kind of photo a person has: HEIC (iPhone), AVIF, TIFF, GIF (still and
animated) and MPO, each made here from a shared photo with a face; the files of a folder that are
not photos reported, never silently skipped; a folder without a photo refused."""
import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageCms, features

from conftest import save_bounded_generator
from test_photos import _exif, _run   # EXIF bytes; the protect command and its output
from experiments import protect as cli
from idguard_jax.image_files import HEIF_READABLE
from idguard_jax.protection import photos
from idguard_jax.protection.photo_io import (PHOTO_SUFFIXES, decode_frames, output_name,
                                             read_photo, unorient)

pytest.importorskip("dlib")
EPS_LEVELS = int(0.05 * 127.5)   # 6 grey levels
needs_heif = pytest.mark.skipif(not HEIF_READABLE, reason="pillow-heif not installed")
needs_avif = pytest.mark.skipif(not features.check("avif"), reason="Pillow without AVIF")


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    return save_bounded_generator(tmp_path_factory.mktemp("gen") / "generator", 64)


@pytest.fixture(scope="module")
def face(shared_photos_dir):
    """A shared photo with one face, small (200 x 270): the face is ~90 px wide."""
    return Image.open(f"{shared_photos_dir}/img1.jpg").convert("RGB").resize((200, 270))


ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'


def _frames(face):
    """Three different frames, each with the face."""
    a = np.asarray(face)
    return [face, Image.fromarray(a[:, ::-1]), Image.fromarray(np.roll(a, 12, axis=1))]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, face):
    """A folder with a photo of each new format, an MPO, and three files that are not photos."""
    d = tmp_path_factory.mktemp("inputs")
    if HEIF_READABLE:
        face.save(d / "phone.heic", "HEIF", quality=90, exif=_exif(1, "iphone"),
                  icc_profile=ICC, xmp=XMP)
    if features.check("avif"):
        turned = Image.fromarray(unorient(np.asarray(face), 6))   # EXIF 6 shows it upright
        turned.save(d / "web.avif", "AVIF", quality=90, exif=_exif(6, "avif"), icc_profile=ICC)
    face.save(d / "scan.tiff", "TIFF", compression="tiff_lzw", exif=_exif(1, "scanner"),
              icc_profile=ICC, dpi=(300, 300))
    face.save(d / "still.gif")
    frames = _frames(face)
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:],
                   duration=[100, 150, 200], loop=0)
    face.save(d / "phone.jpg", format="MPO", save_all=True, append_images=[face.rotate(90)])
    (d / "notes.txt").write_text("hello")
    (d / "more.TXT").write_text("hello")
    (d / "README").write_text("hello")
    return d


def _within_budget(a, b, name):
    diff = np.abs(a.astype(int) - b.astype(int))
    assert 0 < diff.max() <= EPS_LEVELS, (name, diff.max())


@pytest.fixture(scope="module")
def protected(inputs, generator_dir, tmp_path_factory):
    """One run over the folder: (exit status, output folder, JSON report, printed summary)."""
    out = tmp_path_factory.mktemp("out")
    report = out.parent / f"{out.name}-report.json"
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        rc = cli.main([str(inputs), "--out", str(out), "--generator", generator_dir,
                       "--report", str(report), "--batch-size", "4"])
    return rc, out, json.load(open(report)), summary.getvalue()


def test_every_format_is_protected_and_nothing_is_skipped(inputs, protected):
    rc, out, report, stdout = protected
    assert rc == 0
    rows = {r["source"].rsplit("/", 1)[1]: r for r in report["photos"]}
    expected = {"scan.tiff", "still.gif", "anim.gif", "phone.jpg"}
    expected |= {"phone.heic"} if HEIF_READABLE else set()
    expected |= {"web.avif"} if features.check("avif") else set()
    assert set(rows) == expected
    assert all(r["status"] == photos.PROTECTED for r in rows.values()), rows
    # the files that are not photos: listed by suffix with a count, in the summary and the report
    assert report["not_photos"]["not a photo: .txt"]["count"] == 2
    assert report["not_photos"]["not a photo: (no suffix)"]["count"] == 1
    assert "not a photo: .txt (2" in stdout and "not a photo: (no suffix) (1" in stdout
    assert "3 file(s) not a photo" in stdout
    # GIFs: written as PNG, an animation as APNG with every frame protected; the summary says so
    assert not (out / "still.gif").exists() and not (out / "anim.gif").exists()
    assert rows["still.gif"]["written"]["converted"] == "GIF -> PNG"
    assert rows["anim.gif"]["written"]["converted"] == "GIF -> APNG"
    assert "written as PNG instead of GIF (a GIF's 256-colour palette" in stdout
    assert "written as APNG instead of GIF" in stdout


def test_lossless_outputs_keep_format_size_mode_metadata(inputs, protected):
    _, out, report, _ = protected
    rows = {r["source"].rsplit("/", 1)[1]: r for r in report["photos"]}
    cases = [("scan.tiff", "scan.tiff", "TIFF")]
    if HEIF_READABLE:
        cases.append(("phone.heic", "phone.heic", "HEIF"))
    for src, dst, fmt in cases:
        a, b = Image.open(inputs / src), Image.open(out / dst)
        assert (b.format, b.size, b.mode) == (fmt, a.size, a.mode), src
        assert b.info.get("icc_profile") == ICC, src
        _within_budget(read_photo(inputs / src).stored, read_photo(out / dst).stored, src)
        assert rows[src]["kept"] == 1.0 and rows[src]["written"]["lossless"], src
    tiff = Image.open(out / "scan.tiff")
    assert tiff.getexif()[0x010E] == "scanner" and tiff.info["compression"] == "tiff_lzw"
    assert tiff.info["dpi"] == pytest.approx((300, 300))
    if HEIF_READABLE:
        heic = Image.open(out / "phone.heic")
        assert heic.getexif()[0x010E] == "iphone" and heic.info.get("xmp")


def test_gif_becomes_png_and_an_animation_apng(inputs, protected):
    _, out, _, _ = protected
    still = Image.open(out / "still.png")
    assert (still.format, still.size, still.mode) == ("PNG", (200, 270), "RGB")
    _within_budget(read_photo(inputs / "still.gif").stored, read_photo(out / "still.png").stored,
                   "still")
    anim = Image.open(out / "anim.png")
    assert anim.format == "PNG" and anim.n_frames == 3 and anim.size == (200, 270)
    assert _durations(anim) == [100, 150, 200]
    original = read_photo(inputs / "anim.gif")
    assert len(original.frames) == 2
    written = decode_frames((out / "anim.png").read_bytes(), original.mode)
    for i, (a, b) in enumerate(zip(original.layers(), written)):
        _within_budget(a, b, f"frame {i}")          # every frame has its face protected


def _durations(im):
    from PIL import ImageSequence
    return [frame.info["duration"] for frame in ImageSequence.Iterator(im)]


@needs_avif
def test_avif_quality_is_chosen_and_orientation_kept(inputs, protected):
    _, out, report, _ = protected
    row = next(r for r in report["photos"] if r["source"].endswith("web.avif"))
    assert row["written"]["format"] == "AVIF" and not row["written"]["lossless"]
    assert row["written"]["quality"] in photos.AVIF_QUALITIES and 0 < row["kept"] <= 1
    assert row["written"]["quality_rule"].startswith("lowest of [95, 98, 100]")
    a, b = Image.open(inputs / "web.avif"), Image.open(out / "web.avif")
    assert (b.format, b.size, b.mode) == ("AVIF", a.size, a.mode)
    assert b.getexif()[0x0112] == 6 and b.getexif()[0x010E] == "avif"
    assert b.info.get("icc_profile") == ICC
    diff = np.abs(read_photo(inputs / "web.avif").stored.astype(int)
                  - read_photo(out / "web.avif").stored.astype(int))
    assert diff.max() > 0


def test_mpo_is_written_as_jpeg(protected):
    _, out, report, _ = protected
    row = next(r for r in report["photos"] if r["source"].endswith("phone.jpg"))
    assert Image.open(out / "phone.jpg").format == "JPEG"
    assert row["written"]["format"] == "JPEG" and row["written"]["quality"]


def test_keep_gif_and_format_heic(inputs, face, generator_dir, tmp_path, capsys):
    """--keep-gif writes a GIF and says how little its palette keeps; --format heic writes an
    EXIF-rotated JPEG as an upright, lossless HEIC that shows the same."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(inputs / "still.gif", src)
    rc, stdout, _ = _run(capsys, src, "--out", tmp_path / "gif", "--generator", generator_dir,
                         "--keep-gif")
    assert rc == 0 and Image.open(tmp_path / "gif" / "still.gif").format == "GIF"
    assert "written as GIF (--keep-gif): its palette keeps" in stdout
    if not HEIF_READABLE:
        return
    rotated = face.transpose(Image.Transpose.ROTATE_90)       # stored turned; EXIF 6 shows it
    rotated.save(src / "turned.jpg", quality=95, exif=_exif(6, "turned"))
    (src / "still.gif").unlink()
    rc, stdout, _ = _run(capsys, src, "--out", tmp_path / "heic", "--generator", generator_dir,
                         "--format", "heic")
    assert rc == 0 and "written as HEIF instead of JPEG" in stdout
    heic = read_photo(tmp_path / "heic" / "turned.heic")
    assert heic.format == "HEIF" and heic.orientation == 1
    _within_budget(read_photo(src / "turned.jpg").upright, heic.stored, "turned")


def test_a_folder_without_a_photo_exits_2(generator_dir, tmp_path, capsys):
    empty = tmp_path / "docs"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    (empty / "sub").mkdir()
    rc, _, err = _run(capsys, empty, "--out", tmp_path / "out", "--generator", generator_dir)
    assert rc == 2 and f"{empty}: no photo in it" in err
    assert all(s in err for s in PHOTO_SUFFIXES) and "1 .txt" in err and "--recursive" in err
    assert not (tmp_path / "out").exists()


def test_output_names():
    assert output_name("a/b.gif") == "a/b.png"
    assert output_name("a/b.GIF", keep_gif=True) == "a/b.GIF"
    assert output_name("a/b.jpeg", "JPEG") == "a/b.jpeg"
    assert output_name("a/b.jpeg", "HEIF") == "a/b.heic"
    assert output_name("a/b.tif") == "a/b.tif" and output_name("a/b.HEIC") == "a/b.HEIC"
    assert output_name("a/notes.txt") == "a/notes.txt"       # tried as a photo; fails clearly
