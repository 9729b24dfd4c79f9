"""MGDA min-norm solvers: task weights c on the simplex minimising ||sum_i c_i g_i||^2.

ID-Guard weights the per-GAN losses by the multiple-gradient-descent (MGDA) weights: given task
gradients g_1..g_N, find c with c_i >= 0 and sum_i c_i = 1 minimising ||sum_i c_i g_i||^2
= c^T M c, where M_ij = <g_i, g_j> is the (N, N) Gram matrix. Everything here works on M:

* `gram_matrix(task_grads)`: M from a pytree of per-task gradients (leading task axis N).
* `min_norm_reference(M)`: the projected-gradient solver of isl-org/MultiObjectiveOptimization
  (`MinNormSolver.find_min_norm_element`, which ID-Guard's `strategy/MinNorm.py` copies), ported
  step for step, quirks included (0.999 / 0.001 end points, returning the point *before* the last
  update, no effective iteration cap upstream). It is what the PyTorch reference trains with.
* `min_norm_exact(M)`: the true minimiser, by enumerating the 2^N - 1 supports (cheap for the
  handful of tasks ID-Guard has; N <= ~8).
* `min_norm(M, solver)`: dispatch on 'reference' | 'exact'.

How far apart the two solvers are, measured on 20,000 random problems: docs/mgda.md.

All functions are pure jax.numpy, jit/vmap-able, with no Python control flow on traced values;
they compute in float32 under default JAX settings (float64 only if x64 is enabled and the input
is float64). The solvers are not differentiable (the reference uses `lax.while_loop`); the weights
are constants in MGDA, so both solvers apply `lax.stop_gradient` to their input: differentiating
a loss that uses the weights gives zero contribution through them instead of an error.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "gram_matrix", "min_norm_reference", "min_norm_exact", "min_norm", "SOLVERS",
    "REFERENCE_MAX_ITER", "STOP_CRIT",
]

SOLVERS = ("reference", "exact")

# Upstream `MinNormSolver.STOP_CRIT`: stop when the L1 change of c in one step is below this.
STOP_CRIT = 1e-5
# Upstream ignores candidate step lengths at or below this in `_next_point`.
_STEP_EPS = 1e-7
# Our safety cap on the reference loop. Upstream declares MAX_ITER = 250 but never increments its
# counter, so it loops until STOP_CRIT is met (and would hang on a NaN Gram matrix). A few
# random problems need ~10,000 steps (docs/mgda.md), so the cap sits there.
REFERENCE_MAX_ITER = 10_000

_HIGHEST = lax.Precision.HIGHEST


def _as_gram(gram) -> jax.Array:
    m = jnp.asarray(gram)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square (N, N) Gram matrix, got shape {m.shape}")
    if m.shape[0] < 1:
        raise ValueError("the Gram matrix must have at least one task (N >= 1)")
    dtype = jnp.promote_types(m.dtype, jnp.float32)
    return lax.stop_gradient(m.astype(dtype))


def _matvec(m: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.dot(m, v, precision=_HIGHEST)


# --------------------------------------------------------------------------------------------
# Gram matrix
# --------------------------------------------------------------------------------------------

def gram_matrix(task_grads) -> jax.Array:
    """(N, N) Gram matrix M_ij = <g_i, g_j> of per-task gradients.

    Args:
      task_grads: a pytree (e.g. a Flax params dict) whose every leaf has shape (N, ...): leaf[k]
        is task k's gradient for that parameter array. Task k's gradient vector g_k is the
        concatenation of all its flattened leaves.

    Returns:
      (N, N) symmetric PSD matrix, the sum over leaves of the leaf's flattened (N, P) block times
      its transpose, computed with `Precision.HIGHEST` and float32 accumulation (float32 under
      default JAX settings; a leaf's dtype only widens this if it is float64 with x64 enabled).
    """
    leaves = jax.tree_util.tree_leaves(task_grads)
    if not leaves:
        raise ValueError("gram_matrix needs at least one gradient leaf")
    leaves = [jnp.asarray(x) for x in leaves]
    if any(x.ndim < 1 for x in leaves):
        raise ValueError("every gradient leaf needs a leading task axis N")
    n = leaves[0].shape[0]
    if any(x.shape[0] != n for x in leaves):
        sizes = sorted({x.shape[0] for x in leaves})
        raise ValueError(f"all leaves must share the leading task axis; got sizes {sizes}")
    dtype = functools.reduce(jnp.promote_types, [x.dtype for x in leaves], jnp.dtype(jnp.float32))
    total = jnp.zeros((n, n), dtype)
    for x in leaves:
        flat = x.reshape(n, -1).astype(dtype)
        total = total + jnp.einsum("ik,jk->ij", flat, flat, precision=_HIGHEST,
                                   preferred_element_type=dtype)
    return total


# --------------------------------------------------------------------------------------------
# Reference solver (isl-org/MultiObjectiveOptimization, as used by ID-Guard)
# --------------------------------------------------------------------------------------------

def _two_point(v11, v12, v22):
    """Minimise ||gamma x1 + (1 - gamma) x2||^2 over gamma in [0, 1], upstream style.

    v11 = <x1,x1>, v12 = <x1,x2>, v22 = <x2,x2>. Returns (gamma, cost) where cost is the squared
    norm at the minimiser. The end points are reported as 0.999 (x1 is best, cost v11) and 0.001
    (x2 is best, cost v22), never 1 or 0; the first test wins when both hold.
    """
    at_x1 = v12 >= v11
    at_x2 = v12 >= v22
    denom = v11 + v22 - 2.0 * v12          # > 0 whenever neither end point applies
    safe = jnp.where(at_x1 | at_x2, jnp.ones_like(denom), denom)
    gamma_mid = (v22 - v12) / safe
    cost_mid = v22 + gamma_mid * (v12 - v22)
    gamma = jnp.where(at_x1, 0.999, jnp.where(at_x2, 0.001, gamma_mid)).astype(v11.dtype)
    cost = jnp.where(at_x1, v11, jnp.where(at_x2, v22, cost_mid))
    return gamma, cost


def _line_search(m: jax.Array, c: jax.Array, q: jax.Array) -> jax.Array:
    """`_two_point(c^T M c, c^T M q, q^T M q)[0]`, evaluated without cancellation.

    With e = q - c, the rule's three quantities are differences of quadratic forms:
    v12 - v11 = c^T M e, v12 - v22 = -q^T M e, and in the interior gamma = q^T M e / (q^T M e -
    c^T M e). Upstream forms v11, v12, v22 and subtracts them in float64; in float32 that
    subtraction loses most digits near convergence (c ~ q), so the end-point tests flip and the
    loop stops early. Same rule in exact arithmetic, same branches and tie-breaking (>=).
    """
    me = _matvec(m, q - c)
    s_c = jnp.dot(c, me, precision=_HIGHEST)      # v12 - v11
    s_q = jnp.dot(q, me, precision=_HIGHEST)      # v22 - v12
    at_c = s_c >= 0                               # v12 >= v11 -> 0.999
    at_q = s_q <= 0                               # v12 >= v22 -> 0.001
    denom = jnp.where(at_c | at_q, jnp.ones_like(s_q), s_q - s_c)   # > 0 in the interior
    gamma_mid = s_q / denom
    return jnp.where(at_c, 0.999, jnp.where(at_q, 0.001, gamma_mid)).astype(c.dtype)


def _initial_pair(m: jax.Array) -> jax.Array:
    """Best two-task combination: upstream `_min_norm_2d` turned into a weight vector (N >= 2).

    Pairs i < j are scanned in row-major order and the first pair of smallest cost wins (upstream
    keeps a strict `d < dmin`, which `argmin`'s first-occurrence rule reproduces). Upstream starts
    from dmin = 1e8 and crashes if no pair costs less; we simply take the best pair.
    """
    n = m.shape[0]
    ii, jj = np.triu_indices(n, k=1)
    gamma, cost = _two_point(m[ii, ii], m[ii, jj], m[jj, jj])
    k = jnp.argmin(cost)
    c = jnp.zeros((n,), m.dtype)
    c = c.at[jnp.asarray(ii)[k]].set(gamma[k])
    return c.at[jnp.asarray(jj)[k]].set(1.0 - gamma[k])


def _projection2simplex(y: jax.Array) -> jax.Array:
    """Euclidean projection onto the simplex by the upstream sort-and-threshold rule.

    With s = y sorted in decreasing order, the threshold is the first (cumsum(s)[i] - 1) / (i + 1)
    (i = 0..N-2) that exceeds s[i + 1], else (sum(y) - 1) / N; the result is max(y - theta, 0).
    """
    n = y.shape[0]
    s = jnp.sort(y)[::-1]
    cand = (jnp.cumsum(s)[:-1] - 1.0) / jnp.arange(1, n, dtype=y.dtype)
    hit = cand > s[1:]
    theta = jnp.where(jnp.any(hit), cand[jnp.argmax(hit)], (jnp.sum(y) - 1.0) / n)
    return jnp.maximum(y - theta, 0.0)


def _next_point(c: jax.Array, grad: jax.Array) -> jax.Array:
    """Upstream `_next_point`: one projected step along grad (= -M c) from c.

    p = grad - mean(grad). Candidate step lengths are -c_i/p_i where p_i < 0 (set A) and
    (1 - c_i)/p_i where p_i > 0 (set B), each keeping only values > 1e-7. The step starts at
    t = 1; if A is non-empty t = min(A) (this may exceed 1); then if B is non-empty
    t = min(t, min(B)). So t = 1 survives only if A is empty and every element of B is >= 1
    (or B is empty too). The point c + t p is then projected onto the simplex.
    """
    p = grad - jnp.mean(grad)
    neg = p < 0
    pos = p > 0
    inf = jnp.asarray(jnp.inf, c.dtype)
    tm1 = jnp.where(neg, -c / jnp.where(neg, p, 1.0), inf)
    tm2 = jnp.where(pos, (1.0 - c) / jnp.where(pos, p, 1.0), inf)
    ok1 = neg & (tm1 > _STEP_EPS)
    ok2 = pos & (tm2 > _STEP_EPS)
    t = jnp.where(jnp.any(ok1), jnp.min(jnp.where(ok1, tm1, inf)), jnp.ones((), c.dtype))
    t = jnp.where(jnp.any(ok2), jnp.minimum(t, jnp.min(jnp.where(ok2, tm2, inf))), t)
    return _projection2simplex(c + t * p)


def _reference_with_info(gram, max_iter: int = REFERENCE_MAX_ITER):
    """`min_norm_reference` plus (number of loop steps taken, whether STOP_CRIT was met)."""
    m = _as_gram(gram)
    n = m.shape[0]
    if n == 1:
        return jnp.ones((1,), m.dtype), jnp.zeros((), jnp.int32), jnp.ones((), bool)
    c0 = _initial_pair(m)
    if n < 3:
        return c0, jnp.zeros((), jnp.int32), jnp.ones((), bool)

    def cond(state):
        it, _, done = state
        return jnp.logical_not(done) & (it < max_iter)

    def body(state):
        it, c, _ = state
        q = _next_point(c, -_matvec(m, c))
        gamma = _line_search(m, c, q)
        c_new = gamma * c + (1.0 - gamma) * q
        done = jnp.sum(jnp.abs(c_new - c)) < STOP_CRIT
        # Upstream returns the point *before* the step that met the criterion.
        return it + 1, jnp.where(done, c, c_new), done

    it, c, done = lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), c0, jnp.zeros((), bool)))
    return c, it, done


def min_norm_reference(gram, max_iter: int = REFERENCE_MAX_ITER) -> jax.Array:
    """MGDA weights by the reference (isl-org / ID-Guard) projected-gradient min-norm solver.

    Args:
      gram: (N, N) Gram matrix M_ij = <g_i, g_j> (see `gram_matrix`), N >= 1, static shape.
      max_iter: our safety cap on loop steps (a Python int or a traced integer scalar; upstream
        has none in effect). If it is reached the current iterate is returned.

    Returns:
      (N,) weights c >= 0 with sum 1 (up to float round-off), float32 by default:
      * N = 1: [1.].
      * N = 2: the two-point closed form: gamma = (M22 - M12) / (M11 + M22 - 2 M12) on task 0,
        but 0.999 if M12 >= M11 (g_0 alone is best) and 0.001 if M12 >= M22 (g_1 alone is best).
      * N >= 3: start from the best pair (as for N = 2, over all i < j, zeros elsewhere), then
        repeat: q = simplex projection of a step along the projected negative gradient -M c (see
        `_next_point`); exact line search between c and q with the same two-point rule;
        c_new = gamma c + (1 - gamma) q; stop once sum|c_new - c| < 1e-5 and return the previous
        c (not c_new), as upstream does.

    Unlike `min_norm_exact`, this is not the exact minimiser: it never reaches a vertex exactly
    (end points are 0.999 / 0.001), it returns the iterate before the last step, and its stopping
    rule can fire while progress is merely slow: on random 3-6 task problems its objective was
    the minimum to ~1e-10 relative in the median but up to ~20-50% above it where the minimum is
    >= 1% of tr(M), and up to 1.3% of tr(M) above a minimum of ~0 (see the module docstring). It
    is also not invariant to scaling M (the default step t = 1 and the 1e-7 cut-off are
    absolute), exactly like upstream.

    Precision: upstream does this arithmetic in float64 NumPy; here it is float32. The one
    deliberate rewrite is the line search (`_line_search`), which evaluates the same rule
    without cancellation. Even so, the loop is chaotic on some problems (a weight that is exactly
    0 in one precision and ~1e-8 in the other changes the step-length candidates). On 2,000
    random 3-6 task problems the float32 weights matched a float64 transcription of upstream to
    ~1e-7 in the median, by more than 1e-4 on 1-2% of problems and by up to ~0.2 at worst.
    Under x64 this port matches that transcription to ~1e-12 (ties aside).
    """
    return _reference_with_info(gram, max_iter)[0]


# --------------------------------------------------------------------------------------------
# Exact solver
# --------------------------------------------------------------------------------------------

# Ridge added to the support block of the (trace-normalised) KKT system for a second set of
# candidates; it gives singular supports (duplicated or affinely dependent gradients) a finite
# solution. Every candidate is scored by its true objective, so this can never produce a worse
# answer than the un-ridged candidates alone.
_EXACT_RIDGE = 1e-6
# A candidate counts as feasible if all its weights are >= -this; it is then clipped at 0 and
# renormalised, so the point scored (and returned) always lies on the simplex.
_EXACT_FEAS_TOL = 1e-5
# 2^16 supports of 17x17 systems is already ~75 MB of float32; beyond that, refuse.
_EXACT_MAX_TASKS = 16


@functools.lru_cache(maxsize=None)
def _support_masks(n: int) -> np.ndarray:
    """(2^n - 1, n) 0/1 masks of every non-empty subset of range(n); singletons come first."""
    subsets = [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]
    masks = np.zeros((len(subsets), n), np.float32)
    for r, s in enumerate(subsets):
        masks[r, list(s)] = 1.0
    return masks


def min_norm_exact(gram) -> jax.Array:
    """Exact MGDA weights: argmin of c^T M c over the simplex, by support enumeration.

    Args:
      gram: (N, N) symmetric PSD Gram matrix, 1 <= N <= 16 (static shape). Meant for a handful of
        tasks: cost grows as 2^N (on a 2-core CPU ~0.1 ms for N = 5, ~0.5 ms for N = 8).

    Returns:
      (N,) weights c with c_i >= 0 and sum 1 (exactly clipped and renormalised), float32 by
      default.

    Method: M is symmetrised and divided by its trace (if the trace is not positive, all
    gradients are zero and every point is optimal; uniform weights are returned then, and also
    for a non-finite trace). For every
    non-empty support S the equality-constrained problem min c_S^T M_SS c_S s.t. sum c_S = 1 is
    solved through its KKT system [[M_SS, 1], [1^T, 0]] [c_S; lam] = [0; 1] (all supports at once
    with one batched `jnp.linalg.solve`), once as is and once with a 1e-6 ridge on M_SS so that
    singular supports (identical or affinely dependent gradients) also yield a point. Candidates
    with non-finite or clearly negative weights are dropped, the rest are clipped at 0 and
    renormalised, and the one with the smallest true objective c^T M c wins. The optimum's own
    support (made affinely independent, which Caratheodory allows) always has a non-singular
    system whose solution is the optimum, and singletons are always feasible, so the result is
    the minimiser up to float round-off. Ties (e.g. duplicated gradients) are broken arbitrarily.

    Accuracy: on random problems its objective was within ~1e-6 relative (float32 round-off) of
    a float64 brute-force minimum, and never more than that above the reference solver's.
    Compared with `min_norm_reference` this reaches vertices exactly and never stops early; the
    reference's objective is the same to ~1e-10 relative in the median but can be tens of
    percent higher (see the module docstring).
    """
    m = _as_gram(gram)
    n = m.shape[0]
    dtype = m.dtype
    if n > _EXACT_MAX_TASKS:
        raise ValueError(f"min_norm_exact enumerates 2^N - 1 supports; N = {n} is more than "
                         f"{_EXACT_MAX_TASKS}: use min_norm_reference")
    if n == 1:
        return jnp.ones((1,), dtype)
    m = 0.5 * (m + m.T)
    trace = jnp.trace(m)
    usable = jnp.isfinite(trace) & (trace > 0)
    mn = m / jnp.where(usable, trace, 1.0)

    masks = jnp.asarray(_support_masks(n), dtype)                       # (K, n)
    k = masks.shape[0]
    outer = masks[:, :, None] * masks[:, None, :]
    eye = jnp.eye(n, dtype=dtype)
    top_left = mn[None] * outer + eye[None] * (1.0 - masks)[:, None, :]  # c_i = 0 off support
    top = jnp.concatenate([top_left, masks[:, :, None]], axis=2)        # (K, n, n+1)
    bottom = jnp.concatenate([masks, jnp.zeros((k, 1), dtype)], axis=1)[:, None, :]
    kkt = jnp.concatenate([top, bottom], axis=1)                        # (K, n+1, n+1)
    support_diag = jnp.pad(masks, ((0, 0), (0, 1)))[:, :, None] * jnp.eye(n + 1, dtype=dtype)
    ridge = _EXACT_RIDGE * support_diag
    systems = jnp.concatenate([kkt, kkt + ridge], axis=0)               # (2K, n+1, n+1)
    rhs = jnp.zeros((2 * k, n + 1), dtype).at[:, n].set(1.0)
    # One batched LU solve (equivalent to vmapping `jnp.linalg.solve`, and quicker to compile).
    sol = jnp.linalg.solve(systems, rhs[:, :, None])[:, :n, 0]           # (2K, n)

    finite = jnp.all(jnp.isfinite(sol), axis=1)
    sol = jnp.where(finite[:, None], sol, 0.0)
    feasible = finite & jnp.all(sol >= -_EXACT_FEAS_TOL, axis=1)
    clipped = jnp.maximum(sol, 0.0)
    total = jnp.sum(clipped, axis=1)
    feasible = feasible & (total > 0)
    cands = clipped / jnp.where(total > 0, total, 1.0)[:, None]
    obj = jnp.einsum("ki,ij,kj->k", cands, mn, cands, precision=_HIGHEST)
    obj = jnp.where(feasible & jnp.isfinite(obj), obj, jnp.inf)
    best = cands[jnp.argmin(obj)]
    return jnp.where(usable, best, jnp.full((n,), 1.0 / n, dtype))


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

def min_norm(gram, solver: str) -> jax.Array:
    """MGDA weights (N,) for an (N, N) Gram matrix with the named solver.

    solver: 'reference' (`min_norm_reference`, the PyTorch reference's algorithm) or 'exact'
    (`min_norm_exact`, the true minimiser). It is a Python string: mark it static under jit.
    """
    if solver == "reference":
        return min_norm_reference(gram)
    if solver == "exact":
        return min_norm_exact(gram)
    raise ValueError(f"unknown MGDA solver {solver!r}; expected one of {SOLVERS}")
