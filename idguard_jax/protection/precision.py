"""How far a cheaper protection (bfloat16) lands from the float32 one, in grey levels: what
`experiments/check_dtype.py` reports before `idguard protect --dtype bfloat16` is trusted.

    agree = precision.grey_level_agreement(protected_f32, protected_bf16, original)
    share = precision.clamped_share(fast_gen, faces_u8, eps)
    gen = precision.with_output_scale(gen, 0.3)     # a random generator that clamps less
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from idguard_jax.generator import Generator
from idguard_jax.images import to_float
from idguard_jax.protection.fast import FastGenerator, layer_names, generator_output

__all__ = ["grey_level_agreement", "merge_agreement", "clamped_share", "with_output_scale"]


def grey_level_agreement(reference: np.ndarray, test: np.ndarray,
                         original: np.ndarray | None = None) -> dict:
    """Counts for two uint8 pictures (..., C) of the same input: colour values and pixels (all
    channels) within 1 grey level of `reference`, and equal; with `original`, the same over the
    pixels the reference protection changed ('changed_*'). Merge several with merge_agreement."""
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {test.shape}")
    d = np.abs(reference.astype(np.int16) - test.astype(np.int16))
    out = {"values": d.size, "values_within_1": int((d <= 1).sum()),
           "values_equal": int((d == 0).sum()), "pixels": d[..., 0].size,
           "pixels_within_1": int((d.max(-1) <= 1).sum()), "max_diff": int(d.max(initial=0))}
    if original is not None:
        changed = np.any(reference != original, axis=-1)
        dc = d[changed]
        out.update(changed_pixels=int(changed.sum()),
                   changed_pixels_within_1=int((dc.max(-1, initial=0) <= 1).sum()),
                   changed_values_equal=int((dc == 0).sum()))
    return out


def merge_agreement(parts: list[dict]) -> dict:
    """Sum the counts of grey_level_agreement results (max_diff: the largest), and add the
    shares ('share_values_within_1', 'share_pixels_within_1', ...)."""
    total: dict = {}
    for part in parts:
        for k, v in part.items():
            total[k] = max(total.get(k, 0), v) if k == "max_diff" else total.get(k, 0) + v
    shares = {"share_values_within_1": ("values_within_1", "values"),
              "share_values_equal": ("values_equal", "values"),
              "share_pixels_within_1": ("pixels_within_1", "pixels"),
              "share_changed_pixels_within_1": ("changed_pixels_within_1", "changed_pixels"),
              "share_changed_values_equal": ("changed_values_equal", "changed_pixels")}
    for name, (num, den) in shares.items():
        if den in total:
            scale = 3 if name == "share_changed_values_equal" else 1   # values of changed pixels
            total[name] = total[num] / max(scale * total[den], 1)
    return total


def clamped_share(gen: FastGenerator, faces_u8: np.ndarray, eps: float | None = None,
                  batch_size: int = 4) -> float:
    """The share of perturbation values the generator puts at or beyond +-eps (which the clamp
    cuts) on aligned faces (B, S, S, 3) uint8: a precision check means little where most are."""
    eps = gen.config.eps if eps is None else float(eps)
    cut = total = 0
    for i in range(0, len(faces_u8), batch_size):
        g = np.asarray(generator_output(gen.layers, gen.delta_p, to_float(faces_u8[i:i + batch_size]),
                                        config=gen.config, eps=eps))
        cut += int((np.abs(g) >= eps).sum())
        total += g.size
    return cut / max(total, 1)


def with_output_scale(gen: Generator, factor: float) -> Generator:
    """The generator with its last convolution (kernel and bias) times `factor`: the
    pre-tanh output scales by it (a random generator's output clamps at eps on ~2/3 of the values;
    a smaller factor gives a check where fewer are clamped)."""
    last = layer_names(gen.config)["out"]
    params = dict(gen.variables["params"])
    params[last] = jax.tree.map(lambda a: a * factor, params[last])
    return dataclasses.replace(gen, variables={**gen.variables, "params": params})
