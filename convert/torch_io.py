"""Reading official PyTorch checkpoints safely and mapping their state_dicts onto Flax variables.

The only code outside the tests that imports torch. Checkpoints come from links of unknown
origin, so they are read with `weights_only=True` only: a file that needs anything beyond
tensors and plain containers is refused, never unpickled.

The mapping is one generic rule (`to_flax`), which works because every port names its submodules
after the torch keys: numeric tokens join the preceding name ('main.9.main.0.weight' ->
('main_9', 'main_0') + leaf), and leaves translate by what the Flax module holds ('weight' ->
'kernel' / 'scale' / 'weight', 'running_mean' -> batch_stats 'mean', ...).
"""
from __future__ import annotations

import math
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flax import traverse_util

__all__ = ["ConversionError", "load_torch_file", "checkpoint_entry", "state_dict_to_numpy",
           "tensor_to_numpy", "to_flax", "torch_key_to_flax"]

# Torch leaf name -> the Flax leaf names it may become, in order of preference.
_LEAF_CANDIDATES = {
    "weight": ("kernel", "scale", "weight"),
    "running_mean": ("mean",),
    "running_var": ("var",),
}
_FLAX_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
                       "var": "running_var"}
# BatchNorm/InstanceNorm step counters: no Flax counterpart, never used by a forward pass.
_ALWAYS_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")
_LIST_LIMIT = 8


class ConversionError(Exception):
    """A checkpoint cannot be converted; the message names the file and the problem."""


def _weights_only_reason(error: Exception) -> str:
    """The useful part of torch's weights-only refusal (without its advice to disable it)."""
    text = " ".join(str(error).split())
    _, sep, tail = text.partition("WeightsUnpickler error:")
    reason = tail if sep else text
    return reason.split(". ")[0].split(" Check the documentation")[0].strip()[:200]


def load_torch_file(path: str | os.PathLike):
    """torch.load(path) on CPU with weights_only=True: tensors and plain containers only.

    Raises ConversionError naming the file if it is missing, or refused because it holds anything
    else (pickled code or objects), or is not a torch file at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            # Legacy (non-zip) files trigger a protocol warning that says nothing to the user.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path}: refused: not a plain tensor/state_dict file (read with weights_only=True, "
            f"which never runs code from the file: {_weights_only_reason(e)})") from e
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise ConversionError(f"{path}: cannot be read as a PyTorch file "
                              f"({type(e).__name__}: {_weights_only_reason(e)})") from e


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return f"a dict with keys {_short_list([repr(k) for k in obj])}" if obj else "an empty dict"
    return f"a {type(obj).__name__}"


def _short_list(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.to(torch.float32) if t.is_floating_point() else t).numpy()


def checkpoint_entry(obj, key: str, path: str | os.PathLike, what: str):
    """obj[key] of a loaded checkpoint dict (e.g. HiSD's {'gen': ..., 'gen_test': ...}).

    Raises ConversionError naming `path`, `what` was expected and what the file holds instead.
    """
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    raise ConversionError(f"{os.fspath(path)}: expected {what} with a {key!r} entry, "
                          f"found {_describe(obj)}")


def tensor_to_numpy(obj, path: str | os.PathLike) -> np.ndarray:
    """A loaded single tensor as a float32 numpy array; ConversionError naming `path` otherwise."""
    if not isinstance(obj, torch.Tensor):
        raise ConversionError(f"{os.fspath(path)}: expected a single tensor, "
                              f"found {_describe(obj)}")
    return _tensor_to_numpy(obj)


def state_dict_to_numpy(obj, path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A loaded plain state_dict -> {key: numpy array}, floats as float32, integers kept.

    Anything but a non-empty dict of tensors (e.g. a training checkpoint {'G': ..., 'optim': ...})
    raises ConversionError naming `path` and what it holds.
    """
    path = os.fspath(path)
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{path}: expected a state_dict (a dict of tensors), "
                              f"found {_describe(obj)}")
    not_tensors = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
                   if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        raise ConversionError(f"{path}: expected a plain state_dict (a dict of tensors), found a "
                              f"dict whose entries {_short_list(not_tensors)} are not tensors")
    return {k: _tensor_to_numpy(v) for k, v in obj.items()}


def torch_key_to_flax(key: str) -> tuple[tuple[str, ...], str]:
    """'a.b.3.c.10.weight' -> (('a', 'b_3', 'c_10'), 'weight'); 'post_models.2.2.bias' ->
    (('post_models_2_2',), 'bias'). The leaf is still the torch leaf name."""
    *tokens, leaf = key.split(".")
    path: list[str] = []
    for tok in tokens:
        if tok.isdigit() and path:
            path[-1] += "_" + tok
        else:
            path.append(tok)
    return tuple(path), leaf


def _flax_key_to_torch(flat_key: tuple[str, ...]) -> str:
    """Inverse of the mapping, for messages: ('params', 'main_9', 'main_0', 'kernel') ->
    'main.9.main.0.weight'. Trailing '_<digits>' are shown as Sequential/ModuleList indices
    (the torch name 'conv_1' would display as 'conv.1': the mapping cannot tell them apart)."""
    *modules, leaf = flat_key[1:]
    parts = []
    for name in modules:
        tokens = name.split("_")
        n = len(tokens)
        while n > 1 and tokens[n - 1].isdigit():
            n -= 1
        parts.append(".".join(["_".join(tokens[:n]), *tokens[n:]]))
    return ".".join([*parts, _FLAX_TO_TORCH_LEAF.get(leaf, leaf)])


def _expected_torch_shape(flax_leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape a Flax leaf of `shape` converts from (kernels are stored transposed)."""
    if flax_leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if flax_leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def _to_flax_layout(value: np.ndarray, flax_leaf: str, shape: tuple[int, ...]) -> np.ndarray:
    if flax_leaf == "kernel" and value.ndim == 4:
        # Conv2d (O, I, kh, kw) -> HWIO; ConvTranspose2d (I, O, kh, kw) -> (kh, kw, O, I), which
        # is what flax ConvTranspose(transpose_kernel=True) holds.
        return value.transpose(2, 3, 1, 0)
    if flax_leaf == "kernel" and value.ndim == 2:
        return value.T  # Linear (out, in) -> Dense (in, out)
    if value.shape != shape and value.size == math.prod(shape):
        return value.reshape(shape)  # e.g. (1, C, 1, 1) buffers -> (C,)
    return value


def to_flax(state_dict: Mapping[str, np.ndarray], abstract_variables: Mapping,
            ignore: Iterable[str] = (), source: str = "<state_dict>") -> dict:
    """Map a torch state_dict onto Flax variables with the structure of `abstract_variables`.

    Args:
      state_dict: {torch key: numpy array} (see `state_dict_to_numpy`).
      abstract_variables: the target tree of shapes ({'params': ..., 'batch_stats': ...}), e.g.
        from `jax.eval_shape(module.init, ...)`.
      ignore: regexes (re.search on the torch key) of keys to drop; `num_batches_tracked` is
        always dropped.
      source: the file name for error messages.
    Returns:
      A nested dict like `abstract_variables` of numpy arrays in its dtypes.
    Raises:
      ConversionError naming `source`, unless every abstract leaf is filled exactly once, no key
      is left over, and every shape matches; missing keys, unexpected keys and shape mismatches
      are listed in torch naming.
    """
    abstract = traverse_util.flatten_dict(dict(abstract_variables))
    # 'params' first: a name held by several collections goes to the trainable one.
    collections = sorted({k[0] for k in abstract}, key=lambda c: (c != "params", c))
    ignore_res = [re.compile(p) for p in ignore]

    filled: dict[tuple[str, ...], np.ndarray] = {}
    claimed_by: dict[tuple[str, ...], str] = {}
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        if _ALWAYS_IGNORED.search(key) or any(r.search(key) for r in ignore_res):
            continue
        path, leaf = torch_key_to_flax(key)
        target = next((flat for name in _LEAF_CANDIDATES.get(leaf, (leaf,))
                       for coll in collections
                       if (flat := (coll, *path, name)) in abstract), None)
        if target is None:
            unexpected.append(key)
            continue
        if target in claimed_by:
            raise ConversionError(f"{source}: keys {claimed_by[target]!r} and {key!r} both map "
                                  f"to {'/'.join(target)}")
        claimed_by[target] = key
        want = tuple(abstract[target].shape)
        converted = _to_flax_layout(np.asarray(value), target[-1], want)
        if converted.shape != want:
            mismatched.append(f"{key}: {tuple(value.shape)} vs expected "
                              f"{_expected_torch_shape(target[-1], want)}")
            continue
        filled[target] = np.asarray(converted, dtype=abstract[target].dtype)

    missing = [_flax_key_to_torch(k) for k in abstract
               if k not in filled and k not in claimed_by]
    if missing or unexpected or mismatched:
        problems = [f"{len(items)} {one if len(items) == 1 else many} {_short_list(items)}"
                    for one, many, items in (
                        ("missing key", "missing keys", missing),
                        ("unexpected key", "unexpected keys", unexpected),
                        ("shape mismatch", "shape mismatches", mismatched)) if items]
        raise ConversionError(f"{source}: does not match the expected network: "
                              + "; ".join(problems))
    return traverse_util.unflatten_dict(filled)
