"""The converter refuses what it must (pickled code, mismatching state_dicts, overwriting) with
messages that name the file and the keys, and its layout rules are right (transposed convs)."""
import builtins
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn

from convert.convert import KNOWN_MODELS, main as convert_main
from convert.torch_io import ConversionError, to_flax, torch_key_to_flax
from ports.layers import conv_transpose2d
from torch_reference.advgen import ResnetGenerator
from torch_reference.stargan import Generator

REPO = Path(__file__).resolve().parents[1]


class _CreatesFileWhenUnpickled:
    """Unpickling this calls open(marker, 'w'): a stand-in for code run by a hostile checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _tree_snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """Guards the tests below against passing because the payload is inert."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_CreatesFileWhenUnpickled(marker), protocol=2)).close()
    assert marker.exists()


def test_cli_script_refuses_a_torch_save_with_code(tmp_path):
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "200000-G.ckpt"
    torch.save({"main.0.weight": _CreatesFileWhenUnpickled(marker)}, checkpoint)
    run = subprocess.run([sys.executable, "convert/convert.py", "stargan", str(checkpoint),
                          str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2
    assert str(checkpoint) in run.stderr
    assert "refused" in run.stderr and "weights_only" in run.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_refuses_a_legacy_pickle_with_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "AdvG.pth"
    with open(checkpoint, "wb") as f:
        pickle.dump(_CreatesFileWhenUnpickled(marker), f, protocol=2)
    (tmp_path / "optimized_pri_pert.pt").write_bytes(b"")
    assert convert_main(["generator", str(checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "refused" in err
    assert not marker.exists()


def test_mismatching_state_dict_names_the_keys(tmp_path, capsys):
    state = Generator(variant="stargan").state_dict()
    del state["main.4.bias"]
    state["main.0.weight"] = torch.zeros(64, 9, 7, 7)
    state["main.99.weight"] = torch.zeros(3)
    checkpoint = tmp_path / "200000-G.ckpt"
    torch.save(state, checkpoint)
    assert convert_main(["stargan", str(checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(checkpoint) in err
    assert "1 missing key [main.4.bias]" in err
    assert "1 unexpected key [main.99.weight]" in err
    assert "main.0.weight: (64, 9, 7, 7) vs expected (64, 8, 7, 7)" in err


@pytest.mark.parametrize("content, found", [
    ({"G": {"main.0.weight": torch.zeros(1)}, "D": {}}, "'G' (dict)"),
    (torch.zeros(3), "a tensor of shape (3,)"),
])
def test_not_a_plain_state_dict_says_what_it_found(tmp_path, capsys, content, found):
    checkpoint = tmp_path / "G.pth"
    torch.save(content, checkpoint)
    assert convert_main(["aggan", str(checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and found in err


def test_unknown_model_and_bad_options_list_what_is_known(tmp_path, capsys):
    assert convert_main(["relgan9", "x.pth", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ", ".join(KNOWN_MODELS) in err and "generator" in err and "stargan" in err
    assert convert_main(["stargan", "x.pth", str(tmp_path), "--image-size", "30"]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert convert_main(["stargan", str(tmp_path / "missing.ckpt"), str(tmp_path)]) == 2
    assert f"{tmp_path / 'missing.ckpt'}: no such file" in capsys.readouterr().err


def test_existing_bundle_is_not_replaced_without_overwrite(tmp_path, capsys):
    checkpoint = tmp_path / "200000-G.ckpt"
    torch.save(Generator(variant="fpgan").state_dict(), checkpoint)
    args = ["fpgan", str(checkpoint), str(tmp_path / "out")]
    assert convert_main(args) == 0
    before = _tree_snapshot(tmp_path / "out" / "fpgan")
    assert convert_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _tree_snapshot(tmp_path / "out" / "fpgan") == before
    assert convert_main(args + ["--overwrite"]) == 0


def test_generator_prior_missing_or_resized(tmp_path, capsys):
    checkpoint = tmp_path / "AdvG.pth"
    torch.save(ResnetGenerator().state_dict(), checkpoint)
    assert convert_main(["generator", str(checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "optimized_pri_pert.pt") in err and "--prior" in err

    prior = tmp_path / "pri_pert.pt"
    torch.save(torch.zeros(1, 3, 64, 64), prior)
    with pytest.warns(UserWarning, match="resizing it to 32x32"):
        assert convert_main(["generator", str(checkpoint), str(tmp_path / "out"),
                             "--prior", str(prior), "--image-size", "32"]) == 0


def test_torch_keys_map_to_flax_paths():
    assert torch_key_to_flax("main.9.main.0.weight") == (("main_9", "main_0"), "weight")
    assert torch_key_to_flax("post_models.2.2.bias") == (("post_models_2_2",), "bias")
    assert torch_key_to_flax("model0.10.conv_block.6.running_var") == (
        ("model0_10", "conv_block_6"), "running_var")


def test_linear_and_broadcast_shaped_leaves():
    abstract = {"params": {"fc": {"kernel": jax.ShapeDtypeStruct((4, 3), np.float32),
                                  "bias": jax.ShapeDtypeStruct((3,), np.float32)},
                           "norm": {"weight": jax.ShapeDtypeStruct((5,), np.float32)}}}
    fc = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = to_flax({"fc.weight": fc, "fc.bias": np.ones(3, np.float32),
                   "norm.weight": np.ones((1, 5, 1, 1), np.float32)}, abstract)
    np.testing.assert_array_equal(got["params"]["fc"]["kernel"], fc.T)
    assert got["params"]["norm"]["weight"].shape == (5,)
    with pytest.raises(ConversionError, match=r"my\.pth: .*1 missing key \[norm\.weight\]"):
        to_flax({"fc.weight": fc, "fc.bias": np.ones(3, np.float32)}, abstract, source="my.pth")


class _Upsample(nn.Module):
    features: int
    kernel: int
    output_padding: int

    @nn.compact
    def __call__(self, x):
        return conv_transpose2d(self.features, self.kernel, 2, 1, self.output_padding, bias=False,
                                name="up")(x)


def _conv_transpose_by_definition(x, w, stride, padding, output_padding):
    """torch ConvTranspose2d from its definition: x (I, H, W), w (I, O, k, k) -> (O, H', W').
    Each input pixel scatters w into the full output at stride steps; then `padding` is cropped
    from both sides, and `output_padding` extra rows/columns are kept at the bottom/right."""
    c_in, h, _ = x.shape
    k = w.shape[-1]
    n = (h - 1) * stride + k + output_padding
    full = np.zeros((w.shape[1], n, n))
    for c in range(c_in):
        for i in range(h):
            for j in range(h):
                full[:, i * stride:i * stride + k, j * stride:j * stride + k] += x[c, i, j] * w[c]
    size = (h - 1) * stride - 2 * padding + k + output_padding
    return full[:, padding:padding + size, padding:padding + size]


def _flax_conv_transpose(weight: np.ndarray, x_nchw: np.ndarray, output_padding: int) -> np.ndarray:
    module = _Upsample(weight.shape[1], weight.shape[-1], output_padding)
    x = x_nchw.transpose(0, 2, 3, 1)
    variables = to_flax({"up.weight": weight}, jax.eval_shape(module.init, jax.random.key(0), x))
    return np.asarray(module.apply(variables, x)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("kernel, output_padding, expected", [
    # x = [[1, 2], [3, 4]], kernel all ones: each output pixel sums the inputs whose k x k
    # footprint (placed every 2 pixels, then 1 pixel cropped at the top/left) covers it.
    (3, 1, [[1, 3, 2, 2], [4, 10, 6, 6], [3, 7, 4, 4], [3, 7, 4, 4]]),
    (4, 0, [[1, 3, 3, 2], [4, 10, 10, 6], [4, 10, 10, 6], [3, 7, 7, 4]]),
])
def test_conv_transpose_matches_torch(kernel, output_padding, expected):
    x = np.array([[[[1, 2], [3, 4]]]], np.float32)
    ones = np.ones((1, 1, kernel, kernel), np.float32)
    want = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(ones),
                                                stride=2, padding=1, output_padding=output_padding)
    np.testing.assert_array_equal(want[0, 0].numpy(), expected)
    np.testing.assert_allclose(_flax_conv_transpose(ones, x, output_padding)[0, 0], expected,
                               atol=1e-6)

    # Asymmetric kernel with 2 -> 3 channels: catches a missing flip or swapped in/out axes.
    rng = np.random.default_rng(kernel)
    x = rng.normal(size=(1, 2, 3, 3)).astype(np.float32)
    w = rng.normal(size=(2, 3, kernel, kernel)).astype(np.float32)
    by_definition = _conv_transpose_by_definition(x[0], w, 2, 1, output_padding)
    want = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), stride=2,
                                                padding=1, output_padding=output_padding)
    np.testing.assert_allclose(want[0].numpy(), by_definition, atol=1e-5)
    np.testing.assert_allclose(_flax_conv_transpose(w, x, output_padding)[0], by_definition,
                               atol=1e-5)
