"""Task-weighting strategies lambda_k for the per-target losses L_k (paper III-C, Table III).

Every strategy maps this step's per-target values to constant weights (they never carry
gradient). Inputs, each (N,) over targets in a fixed order:
  K      KPI proxy of target k = mask loss on x_adv + mask loss on x_pri (the reference's kpi)
  alpha  prior order-of-magnitude weights alpha_k = 10^n (paper eq. 10)

  equal  lambda_k = 1
  prior  lambda_k = alpha_k
  kpi    lambda_k = alpha_k * beta_k, beta_k = -(1 - K'_k)^tau * log K'_k, K' = clip(K, 1e-13, 1),
         tau = 1 (paper S-II, eq. 10-11; the clip is the reference's)
  dtp    Dynamic task prioritization (Guo et al., ECCV 2018, eq. 3-4 of that paper): a moving
         average of the KPI, kbar_t = a * K'_t + (1 - a) * kbar_{t-1} (a = 0.1, kbar_0 = K'_0), and
         the focal weight lambda_k = -(1 - kbar_k)^gamma * log kbar_k with gamma = 1, no prior.
         As in ID-Guard the KPI proxy is the masked L2 disruption K (higher = easier task).
  hmm    Hard model mining (Guan et al., ICPR 2022, the paper's reference [13]), as we read it:
         each step only the currently hardest model, the one with the smallest disruption K_k, is
         attacked: lambda = one-hot(argmin_k K_k). (That paper's code is not public; this is our
         reading of "mining the hard model", documented so results can be compared.)
  mgda   weights from the min-norm solver on the per-target gradients (paper S-I; in train.py,
         since it needs gradients: see idguard_jax.training.mgda)
"""
from __future__ import annotations

import jax.numpy as jnp

STRATEGIES = ("kpi", "mgda", "equal", "prior", "dtp", "hmm")

KPI_CLIP = (1e-13, 1.0)
DTP_ALPHA = 0.1
DTP_GAMMA = 1.0

__all__ = ["STRATEGIES", "focal_weight", "weights_from_values", "initial_strategy_state"]


def focal_weight(kpi, gamma: float = 1.0):
    """-(1 - k)^gamma * log(k): large for hard tasks (small k), 0 at k = 1."""
    return -jnp.power(1.0 - kpi, gamma) * jnp.log(kpi)


def initial_strategy_state(num_targets: int) -> dict:
    """Per-strategy state carried in the train state (DTP's moving average; -1 = unset)."""
    return {"kpi_ema": -jnp.ones((num_targets,), jnp.float32)}


def weights_from_values(strategy: str, K, alpha, state: dict) -> tuple[jnp.ndarray, dict]:
    """lambda (N,) and the new strategy state, for every strategy except mgda."""
    k = jnp.clip(K, *KPI_CLIP)
    if strategy == "equal":
        return jnp.ones_like(K), state
    if strategy == "prior":
        return alpha, state
    if strategy == "kpi":
        return alpha * focal_weight(k), state
    if strategy == "dtp":
        prev = state["kpi_ema"]
        ema = jnp.where(prev < 0, k, DTP_ALPHA * k + (1.0 - DTP_ALPHA) * prev)
        return focal_weight(ema, DTP_GAMMA), {**state, "kpi_ema": ema}
    if strategy == "hmm":
        return jnp.zeros_like(K).at[jnp.argmin(K)].set(1.0), state
    raise ValueError(f"strategy {strategy!r} has no value-based rule (choose from {STRATEGIES})")
