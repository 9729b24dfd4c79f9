"""The min-norm solver of MGDA, the reference's `strategy/MinNormSolver.py::find_min_norm_element`
(isl-org/MultiObjectiveOptimization), transcribed from its description in float64 NumPy. Shared by
the solver tests (tests/test_mgda.py) and the PyTorch reference step (torch_reference/solver.py)."""
from __future__ import annotations

import numpy as np

__all__ = ["two_point", "projection_to_simplex", "next_point", "min_norm_weights"]

STOP_CRIT = 1e-5     # L1 change of the weights that ends the loop
STEP_EPS = 1e-7      # step-length candidates at or below this are ignored


def two_point(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """min over gamma in [0, 1] of ||gamma x1 + (1 - gamma) x2||^2: (gamma, squared norm), the
    end points reported as 0.999 / 0.001."""
    if v12 >= v11:
        return 0.999, v11
    if v12 >= v22:
        return 0.001, v22
    gamma = (v22 - v12) / (v11 + v22 - 2.0 * v12)
    return gamma, v22 + gamma * (v12 - v22)


def projection_to_simplex(y: np.ndarray) -> np.ndarray:
    s = np.sort(y)[::-1]
    theta = (np.sum(y) - 1.0) / len(y)
    partial = 0.0
    for i in range(len(y) - 1):
        partial += s[i]
        candidate = (partial - 1.0) / (i + 1)
        if candidate > s[i + 1]:
            theta = candidate
            break
    return np.maximum(y - theta, 0.0)


def next_point(c: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """The projected-gradient step from c along grad, to the simplex's nearest face."""
    p = grad - np.mean(grad)
    t = 1.0
    to_zero = -c[p < 0] / p[p < 0]
    to_one = (1.0 - c[p > 0]) / p[p > 0]
    if np.any(to_zero > STEP_EPS):
        t = float(np.min(to_zero[to_zero > STEP_EPS]))
    if np.any(to_one > STEP_EPS):
        t = min(t, float(np.min(to_one[to_one > STEP_EPS])))
    return projection_to_simplex(c + t * p)


def min_norm_weights(gram: np.ndarray, *, max_iter: int = 10_000, strict: bool = False,
                     rng: np.random.Generator | None = None, jitter: float = 0.0) -> np.ndarray:
    """Weights (N,) on the simplex from the tasks' Gram matrix (N, N): the best pair by the
    two-point rule, then (3+ tasks) projected-gradient steps with an exact line search until the
    L1 change is below STOP_CRIT, returning the point BEFORE that last step (after max_iter
    steps the last point; strict: raise instead). rng: adds +-jitter to every positive
    coordinate of every projected point and iterate (a float32-sized disturbance), to find
    knife-edge problems."""
    n = len(gram)
    if n == 1:
        return np.ones(1)
    best = None
    for i in range(n):
        for j in range(i + 1, n):
            gamma, cost = two_point(gram[i, i], gram[i, j], gram[j, j])
            if best is None or cost < best[0]:
                best = (cost, i, j, gamma)
    _, i, j, gamma = best
    c = np.zeros(n)
    c[i], c[j] = gamma, 1.0 - gamma
    if n < 3:
        return c

    def shake(v):
        if rng is None:
            return v
        return np.where(v > 0, np.maximum(v + jitter * rng.uniform(-1, 1, n), 0.0), 0.0)

    for _ in range(max_iter):
        q = shake(next_point(c, -gram @ c))
        gamma, _ = two_point(c @ gram @ c, c @ gram @ q, q @ gram @ q)
        new = shake(gamma * c + (1.0 - gamma) * q)
        if np.sum(np.abs(new - c)) < STOP_CRIT:
            return c
        c = new
    if strict:
        raise RuntimeError(f"min_norm_weights: no convergence in {max_iter} steps")
    return c
