"""Evaluation reports: the paper's tables as Markdown and CSV, and image grids as PNG.

Inputs are `evaluation.summarise` outputs. Numbers are printed with 3 decimals, as the paper's.
"""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image

from idguard_jax.images import to_uint8

__all__ = ["table_one", "table_three", "robustness_table", "details_table", "write_table",
           "grid", "write_grid"]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _markdown(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _csv(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if (isinstance(v, float) and math.isnan(v)) else
                    (f"{v:.6g}" if isinstance(v, float) else v) for v in r])
    return buf.getvalue()


def table_one(rows: Sequence[tuple[str, str, dict]], targets: Sequence[str]):
    """Table I: one row per (dataset, method); per target L2_face, ID sim, DSR; and the average
    DSR. Returns (header, rows)."""
    header = ["dataset", "method"]
    for t in targets:
        header += [f"{t} L2_face", f"{t} ID sim", f"{t} DSR"]
    header.append("avg DSR")
    out = []
    for dataset, method, s in rows:
        r = [dataset, method]
        for t in targets:
            row = s["targets"][t]
            r += [row["l2_face"], row["id_sim"], row["dsr"]]
        r.append(s["average"]["dsr"])
        out.append(r)
    return header, out


def table_three(rows: Sequence[tuple[str, dict]], targets: Sequence[str]):
    """Table III: DSR per target and their average, one row per strategy (generator)."""
    header = ["strategy"] + list(targets) + ["average"]
    return header, [[label] + [s["targets"][t]["dsr"] for t in targets] + [s["average"]["dsr"]]
                    for label, s in rows]


def robustness_table(rows: Sequence[tuple[str, str, str, dict]], targets: Sequence[str]):
    """One row per (dataset, operation, method, summary): per target L2_face, ID sim, DSR;
    average DSR. Returns (header, rows), columns dataset, operation, method, ..."""
    header, body = table_one([(dataset, method, s) for dataset, _, method, s in rows], targets)
    return (["dataset", "operation", "method"] + header[2:],
            [[r[0], op, r[1]] + r[2:] for r, (_, op, _, _) in zip(body, rows)])


def details_table(rows: Sequence[tuple[str, str, dict]], targets: Sequence[str]):
    """The other measurements per (dataset, method, target): how many outputs, how many had an
    undefined L2_face (empty face mask: left out of the mean, a failure in DSR) or ID sim, the
    older criteria's success rates, misdirection (over the outputs whose photo had a face,
    counted), where the face masks came from, the visible cost."""
    header = ["dataset", "method", "target", "outputs", "L2_face NaN", "ID sim NaN",
              "ID distance", "MSE>0.05", "CMUA L2>0.05", "misdirection", "no face on output",
              "misdirection outputs", "masks output/input/template", "PSNR", "SSIM", "Linf max"]
    out = []
    for dataset, method, s in rows:
        for t in targets:
            r = s["targets"][t]
            src = r["mask_source"]
            out.append([dataset, method, t, r["outputs"], r["l2_face_nan"], r["id_sim_nan"],
                        r["id_distance"], r["mse_success"], r["cmua_success"], r["misdirection"],
                        r["misdirection_no_face"], r["misdirection_measured"],
                        f"{src['output']}/{src['input']}/{src['template']}", s["psnr"],
                        s["ssim"], s["linf_max"]])
    return header, out


def write_table(path_stem: str, header, rows, preamble: str = "") -> tuple[str, str]:
    """PATH_STEM.md (preamble + Markdown table) and PATH_STEM.csv; returns both paths."""
    md, cs = path_stem + ".md", path_stem + ".csv"
    with open(md, "w") as f:
        f.write(preamble + ("\n" if preamble else "") + _markdown(header, rows))
    with open(cs, "w") as f:
        f.write(_csv(header, rows))
    return md, cs


def grid(columns: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """Images side by side: columns is a list of (N, S, S, 3) batches (uint8 or float [-1, 1]);
    row i shows image i of every column. White gaps of `gap` px. (rows, cols) uint8 RGB."""
    cols = [to_uint8(c) if np.asarray(c).dtype != np.uint8 else np.asarray(c) for c in columns]
    n, s = cols[0].shape[0], cols[0].shape[1]
    out = np.full((n * s + (n - 1) * gap, len(cols) * s + (len(cols) - 1) * gap, 3), 255, np.uint8)
    for j, c in enumerate(cols):
        for i in range(n):
            out[i * (s + gap):i * (s + gap) + s, j * (s + gap):j * (s + gap) + s] = c[i]
    return out


def write_grid(path: str, columns: Sequence[np.ndarray]) -> str:
    """`grid(columns)` as a PNG file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid(columns)).save(path)
    return path
