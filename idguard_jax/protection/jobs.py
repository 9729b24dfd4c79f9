"""Which photo goes where in a protection run: the (source, output) pairs, and the checks on the
output folder before anything is written (what `idguard protect` plans).

    jobs = jobs.plan_jobs(["photo.jpg", "holiday/"], "protected/", recursive=True)
    jobs.check_writable("protected/")
"""
from __future__ import annotations

import os
from typing import Sequence

from idguard_jax.image_files import list_images
from idguard_jax.protection.photos import TMP_MARK

__all__ = ["plan_jobs", "check_writable", "remove_stale_temporaries"]


def plan_jobs(inputs: Sequence[str], out: str, *, recursive: bool = False,
              png: bool = False) -> list[tuple[str, str]]:
    """(source, output) pairs. A file lands in `out` under its own name; a folder's photos under
    their path relative to that folder (`png`: with the suffix .png). ValueError for a missing
    input, two inputs with the same output, or an output that is an input."""
    out_root = os.path.abspath(out)
    jobs = []
    for arg in inputs:
        if os.path.isdir(arg):
            found = list_images(arg, recursive=recursive)
            jobs += [(f, os.path.join(out_root, os.path.relpath(f, arg))) for f in found]
        elif os.path.isfile(arg):
            jobs.append((arg, os.path.join(out_root, os.path.basename(arg))))
        else:
            raise ValueError(f"{arg}: no such file or folder")
    if png:
        jobs = [(s, os.path.splitext(o)[0] + ".png") for s, o in jobs]
    sources = {os.path.realpath(s): s for s, _ in jobs}
    seen: dict[str, str] = {}
    for source, output in jobs:
        real = os.path.realpath(output)
        if real in sources:
            raise ValueError(f"{source}: its output {output} would overwrite an input; "
                             f"choose another --out")
        if real in seen:
            raise ValueError(f"{seen[real]} and {source} would both be written to {output}")
        seen[real] = source
    return jobs


def check_writable(out: str) -> None:
    """Create `out` and write a probe file into it; ValueError saying why not."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror})") from e
    probe = os.path.join(out, f".idguard-write-probe-{os.getpid()}")
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write into the folder ({e.strerror})") from e


def remove_stale_temporaries(jobs: Sequence[tuple[str, str]]) -> None:
    """Temporary outputs an interrupted run left in the output folders ('.NAME.idguard-tmp-PID')."""
    for folder in {os.path.dirname(o) for _, o in jobs}:
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(".") and TMP_MARK in name:
                    os.remove(os.path.join(folder, name))
