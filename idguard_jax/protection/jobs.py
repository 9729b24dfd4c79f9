"""Which photo goes where in a protection run: the (source, output) pairs, the files of the input
folders that are not photos, and the checks on the output folder before anything is written
(what `idguard protect` plans).

    jobs = jobs.plan_jobs(["photo.jpg", "holiday/"], "protected/", recursive=True)
    others = jobs.not_photos(["photo.jpg", "holiday/"], recursive=True)
    jobs.check_writable("protected/")
"""
from __future__ import annotations

import os
from typing import Sequence

from idguard_jax.image_files import list_images, list_other_files
from idguard_jax.protection.photo_io import PHOTO_SUFFIXES, output_name
from idguard_jax.protection.photos import TMP_MARK

__all__ = ["plan_jobs", "not_photos", "check_writable", "remove_stale_temporaries"]


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower() or "(no suffix)"


def not_photos(inputs: Sequence[str], *, recursive: bool = False) -> dict[str, list[str]]:
    """The files of the input folders that are not photos (by suffix, see
    photo_io.PHOTO_SUFFIXES), by lower-case suffix ('(no suffix)' for none): left as they are,
    and reported. Files named on their own are always tried as photos."""
    found: dict[str, list[str]] = {}
    for arg in inputs:
        if os.path.isdir(arg):
            for path in list_other_files(arg, recursive=recursive, suffixes=PHOTO_SUFFIXES):
                found.setdefault(_suffix(path), []).append(path)
    return dict(sorted(found.items()))


def _folder_photos(folder: str, recursive: bool) -> list[str]:
    """A folder's photos; ValueError naming the folder, the suffixes looked for and what it
    holds instead when there is none."""
    found = list_images(folder, recursive=recursive, suffixes=PHOTO_SUFFIXES)
    if found:
        return found
    others = not_photos([folder], recursive=recursive)
    holds = ", ".join(f"{len(v)} {k}" for k, v in others.items()) or "no file"
    subfolders = not recursive and any(os.path.isdir(os.path.join(folder, f))
                                       for f in os.listdir(folder))
    raise ValueError(f"{folder}: no photo in it (looked for {' '.join(PHOTO_SUFFIXES)}); it "
                     f"holds {holds}" + (" and sub-folders (--recursive searches them)"
                                         if subfolders else ""))


def plan_jobs(inputs: Sequence[str], out: str, *, recursive: bool = False,
              output_format: str | None = None, keep_gif: bool = False
              ) -> list[tuple[str, str]]:
    """(source, output) pairs. A file lands in `out` under its own name; a folder's photos under
    their path relative to that folder; the suffix becomes the written format's
    (photo_io.output_name: `output_format`, and .gif -> .png unless `keep_gif`). ValueError
    for a missing input, a folder without a photo, two inputs with the same output, or an
    output that is an input."""
    out_root = os.path.abspath(out)
    jobs = []
    for arg in inputs:
        if os.path.isdir(arg):
            jobs += [(f, os.path.join(out_root, os.path.relpath(f, arg)))
                     for f in _folder_photos(arg, recursive)]
        elif os.path.isfile(arg):
            jobs.append((arg, os.path.join(out_root, os.path.basename(arg))))
        else:
            raise ValueError(f"{arg}: no such file or folder")
    jobs = [(s, output_name(o, output_format, keep_gif)) for s, o in jobs]
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
