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


def load_bundle(path: str | os.PathLike, abstract_tree: Any = None) -> tuple[Any, dict]:
    """Read a bundle: (tree of numpy/jax arrays, meta).

    With `abstract_tree` (e.g. from `jax.eval_shape`) the stored shapes must match it.
    """
    path = os.path.abspath(os.fspath(path))
    meta = read_meta(path)
    ckptr = ocp.StandardCheckpointer()
    if abstract_tree is None:
        tree = ckptr.restore(os.path.join(path, _TREE))
    else:
        tree = ckptr.restore(os.path.join(path, _TREE), abstract_tree)
    return tree, meta


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
