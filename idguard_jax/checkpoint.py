"""The one place for checkpoint IO (Orbax).

Two kinds of files:
- a *bundle*: a folder holding one pytree of arrays (`tree/`, Orbax) and a JSON `meta.json`
  (what it is, its configuration, where it came from). Converted networks and exported
  generators are bundles.
- a *training run*: `CheckpointManager` steps in a work directory, each with the train state and
  a JSON record of the configuration and data position.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["save_bundle", "load_bundle", "read_meta", "RunCheckpointer"]

_TREE = "tree"
_META = "meta.json"


def save_bundle(path: str | os.PathLike, tree: Any, meta: dict, overwrite: bool = False) -> str:
    """Write `tree` (a pytree of arrays) and `meta` (JSON-serialisable) to folder `path`.

    Refuses to replace an existing bundle unless `overwrite`. Returns the absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(os.path.join(path, _META)) and not overwrite:
        raise FileExistsError(f"{path}: a bundle is already there (use overwrite to replace it)")
    os.makedirs(path, exist_ok=True)
    tree = jax.tree.map(np.asarray, tree)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, _TREE), tree, force=True)
    ckptr.wait_until_finished()
    # meta last: its presence marks a complete bundle. In a multi-host run every process saves
    # the tree together (Orbax coordinates them) but one writes the meta, then all wait for it.
    if jax.process_index() == 0:
        tmp = os.path.join(path, _META + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(path, _META))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"idguard_jax bundle {path}")
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """The `meta.json` of a bundle; FileNotFoundError naming the folder if it is not one."""
    meta_path = os.path.join(os.fspath(path), _META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path}: not a bundle (no {_META}); was it written completely?")
    with open(meta_path) as f:
        return json.load(f)


def load_bundle(path: str | os.PathLike, *, kind: str | None = None, abstract: Any = None,
                what: str | None = None, hint: str = "") -> tuple[Any, dict]:
    """Read a bundle: (tree of numpy arrays, meta), refusing one that is not what the caller wants.

    kind: the meta's 'kind' must equal it (`what` names such a bundle in the error).
    abstract: the expected tree (arrays or jax.ShapeDtypeStruct, e.g. from jax.eval_shape), or a
    function meta -> that tree (when the shapes follow from the stored config; it may raise
    ValueError to refuse the meta). A dict names the top-level entries it checks (others, e.g.
    a generator's delta_p, are the caller's to check); each must match leaf for leaf, in names
    and shapes. Errors name `path`, the first mismatching leaf and `hint` (how to make the
    right bundle).
    """
    path = os.path.abspath(os.fspath(path))
    meta = read_meta(path)
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{path}: not a {what or kind} bundle (kind={meta.get('kind')!r})"
                         + (f"; {hint}" if hint else ""))
    tree = ocp.StandardCheckpointer().restore(os.path.join(path, _TREE))
    if abstract is not None:
        try:
            expected = abstract(meta) if callable(abstract) else abstract
        except ValueError as e:   # the meta says it is not what the caller wants
            raise ValueError(f"{path}: {e}" + (f"; {hint}" if hint else "")) from None
        if isinstance(expected, dict) and isinstance(tree, dict):
            got = {k: tree[k] for k in expected if k in tree}
        else:
            got = tree
        mismatch = _first_mismatch(got, expected)
        if mismatch:
            raise ValueError(f"{path}: {mismatch}" + (f"; {hint}" if hint else ""))
    return tree, meta


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
            tuple(np.shape(leaf)) for path, leaf in flat}


def _first_mismatch(tree: Any, expected: Any) -> str | None:
    """What first differs between the stored `tree` and `expected` (names, then shapes)."""
    got, want = _leaf_shapes(tree), _leaf_shapes(expected)
    for name in want:
        if name not in got:
            return f"leaf {name} is missing (expected shape {want[name]})"
        if got[name] != want[name]:
            return f"leaf {name} has shape {got[name]}, expected {want[name]}"
    for name in got:
        if name not in want:
            return f"leaf {name} (shape {got[name]}) is not in the expected tree"
    return None


class RunCheckpointer:
    """Periodic checkpoints of a training run in `workdir/checkpoints` (keeps the last few)."""

    def __init__(self, workdir: str | os.PathLike, max_to_keep: int = 3):
        self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, record: dict) -> None:
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
        return out.state, out.record

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
