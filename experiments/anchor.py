"""The PyTorch anchor of `experiments/bench.py --against torch`: our step and protection timed
against the reference's, in the same process, on the same random weights and inputs.

The torch side is tests/torch_reference (the reference forwards and `solver.ReferenceStep`, the
reference's `solver.py::train_batch` in eager PyTorch). Every torch network is built in the
official layout with random weights and converted to our variables with the converters' own
mapping (`convert.torch_io.to_flax`), as the parity tests do, so both sides hold the same
numbers. Our side is the library's jitted step (`training.step.make_train_step`) and protection
(`generator.protect_eval`); nothing is copied.

    anchor = build(cfg, vggface="tiny")          # both sides, same weights, same batch
    diffs = compare_one_step(anchor)             # losses, weights, gradients, BN stats, Adam
    record = bench_step(anchor, repeats, warmup) # reference time / our time, round-robin

This module imports torch; bench.py imports it only under --against torch.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from convert.convert import TARGETS as CONVERTERS
from convert.torch_io import state_dict_to_numpy, to_flax
from idguard_jax.config import TrainConfig
from idguard_jax.generator import Generator, GeneratorConfig, abstract_generator, protect_eval
from idguard_jax.images import as_float_images
from idguard_jax.networks import gradcam
from idguard_jax.networks import hisd as hisd_target
from idguard_jax.networks import identity as identity_lib
from idguard_jax.networks import targets as targets_lib
from idguard_jax.protection import fast
from idguard_jax.training import mgda
from idguard_jax.training import step as train
from idguard_jax.training.frozen import Frozen
from idguard_jax.training.strategies import weights_from_values
from ports.vggface import VGGFace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TESTS = os.path.join(REPO, "tests")
if not os.path.isdir(os.path.join(_TESTS, "torch_reference")):
    raise ImportError(f"{_TESTS}/torch_reference not found: the PyTorch anchor needs the "
                      "repository checkout (its tests/torch_reference)")
if _TESTS not in sys.path:   # the same module name the tests import it by
    sys.path.insert(0, _TESTS)

from torch_reference import randomize_norms_  # noqa: E402
from torch_reference import hisd as torch_hisd  # noqa: E402
from torch_reference import solver  # noqa: E402
from torch_reference.advgen import ResnetGenerator  # noqa: E402
from torch_reference.arcface import ResNet as ArcFace, randomize_prelus_  # noqa: E402
from torch_reference.relgan import G as RelGAN, randomize_switch_norms_  # noqa: E402
from torch_reference.stargan import Generator as StarGANFamily  # noqa: E402
from torch_reference.standin import StandIn  # noqa: E402
from torch_reference.vggface import VggFace  # noqa: E402

__all__ = ["Anchor", "build", "compare_one_step", "bench_step", "bench_protect",
           "our_components", "torch_components", "component_table", "OUR_PROTECTION",
           "IDENTITIES", "VGG_TINY", "VGG_OFFICIAL"]

# The identity networks the reference can use (its id_extractor Arc / Vgg) and the stand-in.
IDENTITIES = ("arcface", "vggface", "standin")
VGG_OFFICIAL = {"widths": (64, 128, 256, 512, 512), "fc_width": 4096, "num_classes": 2622}
VGG_TINY = {"widths": (4, 4, 8, 8, 8), "fc_width": 16, "num_classes": 10}


# ------------------------------------------------------------------------------------------
# Both sides on the same weights
# ------------------------------------------------------------------------------------------

def _numpy_state(module: torch.nn.Module) -> dict:
    return state_dict_to_numpy(module.state_dict(), f"<{type(module).__name__}>")


def _as_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


@torch.no_grad()
def _he_init_(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """He-normal weights, small biases: VGG has no norms, and torch's default init fades the
    signal out through its 13 layers (the CAM would be noise)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen)
                           * (2 / m.weight[0].numel()) ** 0.5)
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return module


@torch.no_grad()
def _reference_init_(generator: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """The reference's `net/advGen.py::weights_init`: convs N(0, 0.02), bias 0; BN N(1, 0.02)."""
    for m in generator.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.weight.copy_(0.02 * torch.randn(m.weight.shape, generator=gen))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.copy_(1 + 0.02 * torch.randn(m.weight.shape, generator=gen))
            m.bias.zero_()
    return generator


def _target_pair(name: str, cfg: TrainConfig, gen: torch.Generator):
    """(TorchTarget, our variables) of one target at cfg's size, random weights."""
    size = targets_lib.size_config(name, cfg.target_size)
    s = cfg.image_size
    abstract = targets_lib.abstract_variables(name, image_size=s, config=size)
    if name in ("stargan", "aggan", "fpgan"):
        defaults = targets_lib.TARGETS[name].default_config
        module = randomize_norms_(StarGANFamily(
            conv_dim=size.get("conv_dim", defaults["conv_dim"]), c_dim=defaults["c_dim"],
            repeat_num=size.get("repeat_num", defaults["repeat_num"]), variant=name), gen)
        variables = to_flax(_numpy_state(module), abstract, CONVERTERS[name].ignore)
        return solver.TorchTarget(name, name, module), variables
    if name == "relgan":
        module = randomize_switch_norms_(RelGAN(n_repeat=size.get("n_repeat", 6)), gen)
        return solver.TorchTarget(name, name, module), to_flax(_numpy_state(module), abstract)
    if name == "hisd":
        hcfg = {**hisd_target.default_target_config(), **size}
        module = torch_hisd.randomize_norms_(torch_hisd.Gen(hcfg), gen)
        refs = torch.rand(len(hcfg["references"]), 3, s, s, generator=gen) * 2 - 1
        variables = to_flax(_numpy_state(module), {"params": abstract["params"]})
        variables["references"] = {"images": refs.permute(0, 2, 3, 1).numpy()}
        conds = [(c["reference"], c["tag"]) for c in hcfg["conditions"]]
        return solver.TorchTarget(name, name, module, refs, conds), variables
    raise ValueError(f"--targets: {name!r} has no PyTorch reference")


def _identity_pair(cfg: TrainConfig, gen: torch.Generator):
    """(TorchIdentity, our variables) of cfg's identity network, random weights."""
    name, config = cfg.identity, dict(cfg.identity_config)
    if name not in IDENTITIES:
        raise ValueError(f"--identity {name}: the PyTorch anchor supports {', '.join(IDENTITIES)}"
                         " (the reference's ArcFace / VGGFace, and the tests' stand-in)")
    full = {**identity_lib.IDENTITY_NETS[name].default_config, **config}
    if name == "arcface":
        module = randomize_prelus_(randomize_norms_(ArcFace(tuple(full["layers"])), gen), gen)
    elif name == "vggface":
        module = _he_init_(VggFace(full["widths"], full["fc_width"], full["num_classes"]), gen)
    else:
        module = StandIn(full["width"])
    net = identity_lib.build(name, config)
    variables = to_flax(_numpy_state(module), identity_lib.abstract_variables(name, config=config))
    return solver.TorchIdentity(module, net.input_size), variables


def _generator_pair(cfg: TrainConfig, gen: torch.Generator, randomize_norms: bool,
                    last_scale: float):
    """(torch generator, prior (1, 3, S, S), our variables, delta_p (S, S, 3)).

    The reference's init; randomize_norms moves BatchNorm's affine parameters and running
    statistics off their defaults (a test then sees them all); last_scale scales the last conv
    (how much of the perturbation reaches +-eps)."""
    module = _reference_init_(ResnetGenerator(ngf=cfg.ngf, n_blocks=cfg.n_blocks), gen)
    if randomize_norms:
        randomize_norms_(module, gen)
    with torch.no_grad():
        module.model0[-2].weight.mul_(last_scale)
    s = cfg.image_size
    prior = (0.6 * cfg.eps * torch.randn(1, 3, s, s, generator=gen)).clamp(-cfg.eps, cfg.eps)
    variables = to_flax(_numpy_state(module), abstract_generator(cfg.generator))
    return module, prior, variables, prior[0].permute(1, 2, 0).numpy()


def _vgg_pair(config: dict, gen: torch.Generator):
    module = _he_init_(VggFace(config["widths"], config["fc_width"], config["num_classes"]),
                       gen).eval()
    ours = VGGFace(**config)
    variables = to_flax(_numpy_state(module), identity_lib.abstract_variables("vggface",
                                                                                config=config))
    return module, ours, _as_jax(variables)


def _random_inputs(cfg: TrainConfig, seed: int) -> dict:
    """Images (float32 in [-1, 1], from uint8), binary masks, labels: host arrays."""
    rng = np.random.default_rng(seed)
    s, b = cfg.image_size, cfg.batch_size
    return {"image": as_float_images(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)),
            "mask": (rng.random((b, s, s, 1)) > 0.5).astype(np.float32),
            "labels": rng.integers(0, 2, (b, 5)).astype(np.float32)}


def _nchw(x: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))).to(device)


@dataclasses.dataclass
class Anchor:
    """Our step's inputs and the reference step, on the same weights and the same batch."""
    cfg: TrainConfig
    setup: train.Setup
    state: train.TrainState
    frozen: Frozen
    batch: dict                   # ours: image, mask, heatmap (the torch side's), labels
    torch_step: solver.ReferenceStep
    torch_inputs: tuple           # (x (B,3,S,S), mask (B,3,S,S), labels (B,5))
    vgg: tuple                    # (torch VggFace, our VGGFace module, its variables)
    device: torch.device


def torch_device() -> torch.device:
    """The device JAX computes on, for the torch side too."""
    if jax.default_backend() == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("JAX runs on a GPU but this torch has no CUDA: install a CUDA "
                               "torch for --against torch, or run both on the CPU")
        return torch.device("cuda")
    return torch.device("cpu")


def build(cfg: TrainConfig, *, vggface: str = "official", seed: int = 0,
          randomize_generator_norms: bool = False, generator_last_scale: float = 1.0,
          device: torch.device | None = None) -> Anchor:
    """Both sides of cfg (its strategy 'kpi' or 'mgda', float32) on the same random weights.

    vggface: 'official' (the reference's VGG-16, 145 M parameters) or 'tiny' widths for the
    Grad-CAM++ network. Our batch's heatmap is the Grad-CAM++ the torch side computes (each
    torch step recomputes it, as the reference does)."""
    if cfg.dtype != "float32":
        raise ValueError("the PyTorch anchor's step is float32 (the reference's CPU numerics)")
    if cfg.strategy not in ("kpi", "mgda"):
        raise ValueError(f"--strategies {cfg.strategy}: the reference weighs by kpi or mgda")
    if cfg.mgda_gradients != "params" or cfg.all_conditions or getattr(cfg, "robust", ""):
        raise ValueError("the PyTorch anchor has the reference's step only: MGDA over G's "
                         "parameters, one condition per step, no lossy channels")
    device = device or torch_device()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pairs = [_target_pair(n, cfg, gen) for n in cfg.targets]
    identity, identity_vars = _identity_pair(cfg, gen)
    generator, prior, gen_vars, delta_p = _generator_pair(cfg, gen, randomize_generator_norms,
                                                          generator_last_scale)
    vgg_t, vgg_module, vgg_vars = _vgg_pair(VGG_TINY if vggface == "tiny" else VGG_OFFICIAL, gen)

    setup = train.create_setup(cfg)
    state = train.init_state(setup, jax.random.key(seed), delta_p)
    trainable = {"params": _as_jax(gen_vars["params"]), "delta_p": state.delta_p}
    state = state.replace(params=trainable["params"],
                          batch_stats=_as_jax(gen_vars["batch_stats"]),
                          opt_state=setup.optimizer.init(trainable))
    frozen = Frozen(targets={t.name: _as_jax(v) for t, v in pairs},
                    identity=_as_jax(identity_vars))

    table = targets_lib.PRIOR_WEIGHTS[cfg.prior_weights]
    step = solver.ReferenceStep(
        generator, prior, [t for t, _ in pairs], identity, vgg_t, strategy=cfg.strategy,
        prior_weights={n: table[n] for n in cfg.targets}, eps=cfg.eps, lr=cfg.learning_rate,
        betas=(cfg.b1, cfg.b2),
        loss=solver.LossWeights(cfg.loss.w_mask, cfg.loss.w_id, cfg.loss.w_feat),
        mask_mode=cfg.loss.mask_mode, device=device)
    host = _random_inputs(cfg, seed)
    x = _nchw(host["image"], device)
    mask = _nchw(host["mask"], device).repeat(1, 3, 1, 1)   # the reference's 3-channel mask
    labels = torch.from_numpy(host["labels"]).to(device)
    heatmap = solver.gradcam_plusplus(vgg_t.to(device), x)[:, :1].permute(0, 2, 3, 1)
    batch = {**host, "heatmap": heatmap.cpu().numpy()}
    return Anchor(cfg, setup, state, frozen, batch, step, (x, mask, labels),
                  (vgg_t, vgg_module, vgg_vars), device)


# ------------------------------------------------------------------------------------------
# One step, both sides: what differs
# ------------------------------------------------------------------------------------------

def _rel(a, b) -> float:
    """max |a - b| / max |b| (b the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def _worst_leaf(ours, theirs) -> float:
    return max(_rel(x, y) for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs),
                                          strict=True))


def _torch_tree(module: torch.nn.Module, abstract, values: Callable[[torch.nn.Parameter], Any],
                with_buffers: bool = False):
    """Per parameter values(p) (its .grad, Adam's exp_avg, ...) mapped into our layout."""
    named = {n: values(p) for n, p in module.named_parameters()}
    if with_buffers:
        named.update({n: b for n, b in module.named_buffers()})
    return to_flax({n: v.detach().cpu().float().numpy() for n, v in named.items()}, abstract)


ADAM_EPS = 1e-8   # optax.adam's and torch.optim.Adam's default


def compare_one_step(anchor: Anchor) -> dict[str, float]:
    """One step of each side from the same state (ours: the library's make_train_step): the
    largest relative error of every quantity, ours against torch's: losses and their terms,
    KPIs, task weights, the objective, the heatmap (our gradcam.heatmaps vs torch's), G's and
    delta_p's gradients, the new BatchNorm statistics, Adam's second moments (their square
    roots) and the new parameters. Advances the torch side one step.

    The gradients are read from Adam's first moment, mu = (1 - b1) g after one step (one
    compilation instead of two). The first update is lr g / (|g| + eps_adam): +-lr wherever
    |g| >> eps_adam, so it cannot tell two gradients apart, and of slope lr / eps_adam at g ~ 0,
    so there the two sides' float32 rounding of a vanishing gradient (a few 1e-9) moves a
    parameter by up to ~lr. Hence two checks: "Adam rule", our optimiser applied to torch's
    gradients from the same state, every element against torch's new parameters; and
    "params after Adam", our step's own new parameters where the update is well conditioned
    (|g| >= 100 eps_adam)."""
    setup, cfg = anchor.setup, anchor.cfg
    x, mask, labels = anchor.torch_inputs
    new_state, m = train.make_train_step(setup, donate=False)(anchor.state, anchor.batch,
                                                              anchor.frozen)
    m = jax.device_get(m)
    theirs = anchor.torch_step.train_batch(x, mask, labels)

    diffs = {}
    names = list(cfg.targets)
    diffs["loss"] = _rel([m[f"{n}/loss"] for n in names], [theirs.losses[n] for n in names])
    term_keys = sorted(theirs.terms[names[0]])
    diffs["loss terms"] = _rel([m[f"{n}/{k}"] for n in names for k in term_keys],
                               [theirs.terms[n][k] for n in names for k in term_keys])
    diffs["kpi"] = _rel([m[f"{n}/kpi"] for n in names], [theirs.kpi[n] for n in names])
    diffs["weights"] = _rel([m[f"{n}/lambda"] for n in names],
                            [theirs.weights[n] for n in names])
    diffs["objective"] = _rel(m["objective"], theirs.objective)
    _, vgg_module, vgg_vars = anchor.vgg
    heat = gradcam.heatmaps(vgg_module, vgg_vars, jnp.asarray(anchor.batch["image"]))
    diffs["heatmap"] = _rel(heat, theirs.heatmap[:, :1].permute(0, 2, 3, 1).cpu().numpy())

    gen, prior = anchor.torch_step.generator, anchor.torch_step.prior
    abstract = abstract_generator(cfg.generator)
    params_only = {"params": abstract["params"]}

    def nhwc(t):
        return t.detach()[0].permute(1, 2, 0).cpu().numpy()

    adam = new_state.opt_state[0]
    # both descend on G_loss = -objective: mu / (1 - b1) is torch's .grad
    grad = jax.tree.map(lambda v: v / (1.0 - cfg.b1), adam.mu)
    torch_grad = {"params": _torch_tree(gen, params_only, lambda p: p.grad)["params"],
                  "delta_p": nhwc(prior.grad)}
    diffs["grad G"] = _worst_leaf(grad["params"], torch_grad["params"])
    diffs["grad delta_p"] = _rel(grad["delta_p"], torch_grad["delta_p"])
    stats = _torch_tree(gen, abstract, lambda p: p, with_buffers=True)["batch_stats"]
    diffs["batch stats"] = _worst_leaf(new_state.batch_stats, stats)
    torch_adam = anchor.torch_step.optimizer.state
    # sqrt(nu) = sqrt(1 - b2) |g|: on the gradient's scale (nu itself doubles g's relative error)
    diffs["adam nu G"] = _worst_leaf(jax.tree.map(jnp.sqrt, adam.nu["params"]), _torch_tree(
        gen, params_only, lambda p: torch_adam[p]["exp_avg_sq"].sqrt())["params"])
    diffs["adam nu delta_p"] = _rel(jnp.sqrt(adam.nu["delta_p"]),
                                    nhwc(torch_adam[prior]["exp_avg_sq"].sqrt()))
    torch_new = {"params": _torch_tree(gen, params_only, lambda p: p)["params"],
                 "delta_p": nhwc(prior)}
    diffs["Adam rule"] = _worst_leaf(_adam_step(setup, anchor.state, torch_grad), torch_new)
    conditioned = jax.tree.map(lambda g: np.abs(g) >= 100 * ADAM_EPS, torch_grad)
    ours_new = {"params": new_state.params, "delta_p": new_state.delta_p}
    diffs["params after Adam"] = max(
        _rel(np.asarray(a)[c], np.asarray(b)[c]) for a, b, c in zip(
            jax.tree.leaves(ours_new), jax.tree.leaves(torch_new), jax.tree.leaves(conditioned),
            strict=True) if c.any())
    return diffs


def _adam_step(setup: train.Setup, state: train.TrainState, descent) -> dict:
    """The library's update (train.apply_gradients) from `state` along `descent` (torch's
    .grad, of -objective): the new {'params', 'delta_p'}."""
    ascent = jax.tree.map(np.negative, descent)
    new = train.apply_gradients(setup, state, train.Gradients(
        grads=ascent, batch_stats=state.batch_stats, strategy_state=state.strategy_state,
        weights=None, metrics={}))
    return {"params": new.params, "delta_p": new.delta_p}


# ------------------------------------------------------------------------------------------
# Timing: the step
# ------------------------------------------------------------------------------------------

def _load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages, warned about when above its core count: the
    torch side's OpenMP threads slow down far more than XLA's when cores are oversubscribed
    (ArcFace's forward on 2 busy cores: 4x slower with 2 threads than with 1), which would
    flatter our ratio."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
    if load[0] > (os.cpu_count() or 1):
        print(f"warning: load average {load[0]} above the {os.cpu_count()} cores: other work "
              "on this machine distorts the torch side's times most; measure on a quiet "
              "machine", file=sys.stderr)
    return load


def _first_step_check(ours_metrics: dict, theirs: solver.StepOutput, names) -> dict:
    """How far the first timed steps' losses and weights are apart (both from one state)."""
    return {"loss": _rel([ours_metrics[f"{n}/loss"] for n in names],
                         [theirs.losses[n] for n in names]),
            "weights": _rel([ours_metrics[f"{n}/lambda"] for n in names],
                            [theirs.weights[n] for n in names])}


def _repeat_check(first: dict, again: dict, names) -> dict:
    """How far two of our calls on the same state and batch are apart (losses, weights): 0 for
    a deterministic program. XLA:CPU's multi-threaded runtime is not always (jax-ml/jax#39741):
    on the Xeon at 256 px, batch 2, 2 calls in 10 of our step gave a target loss 2e-5 off."""
    return {key: _rel([again[f"{n}/{metric}"] for n in names],
                      [first[f"{n}/{metric}"] for n in names])
            for key, metric in (("loss", "loss"), ("weights", "lambda"))}


# Warm-up rounds of the step anchor, at least: both sides share one process and (host malloc
# retained) one heap, which reaches its steady size only once each side has run after the
# other. On the Xeon at 256 px, batch 2, our call of the second round still faulted in
# ~970k fresh pages (15 s of system time: 29.8 s against 22.2 s in later rounds).
MIN_WARMUP_ROUNDS = 2


class _CallTimes:
    """Wall seconds, system seconds and minor page faults of each timed call."""

    def __init__(self):
        self.wall, self.sys, self.faults = [], [], []

    def time(self, fn, *args):
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn(*args)
        wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        self.wall.append(wall)
        self.sys.append(r1.ru_stime - r0.ru_stime)
        self.faults.append(r1.ru_minflt - r0.ru_minflt)

    def record(self, side: str) -> dict:
        return {f"{side}_step_s": round(statistics.median(self.wall), 6),
                f"{side}_step_s_min": round(min(self.wall), 6),
                f"{side}_sys_s": round(statistics.median(self.sys), 3),
                f"{side}_page_faults": int(statistics.median(self.faults))}


def _warn_faults(record: dict) -> None:
    for side in ("ours", "torch"):
        if record[f"{side}_page_faults"] > 10_000:
            print(f"warning: {side} timed calls faulted in {record[f'{side}_page_faults']} "
                  f"fresh pages per call ({record[f'{side}_sys_s']} s of system time): the "
                  "heap had not reached its steady size; raise --warmup", file=sys.stderr)


def bench_step(anchor: Anchor, repeats: int, warmup: int) -> tuple[dict, list[dict]]:
    """Our jitted step (the library's make_train_step) and the reference step, each call timed
    alone, round-robin (one of each per round) so that a shared machine's load falls on both
    alike, after max(warmup, MIN_WARMUP_ROUNDS) rounds. Returns (the record: medians and
    minima, and each side's median system time and page faults per timed call; the torch
    sections' seconds per timed call)."""
    from experiments import bench

    cfg = anchor.cfg
    state = jax.tree.map(jnp.copy, anchor.state)   # donated by the step
    batch = jax.device_put(anchor.batch)
    record, ours_call = bench.prepare(train.make_train_step(anchor.setup),
                                      (state, batch, anchor.frozen), carry_first=True)
    x, mask, labels = anchor.torch_inputs
    _load_average()

    def torch_call(timer=solver._untimed):
        return anchor.torch_step.train_batch(x, mask, labels, timer)

    rounds = max(warmup, MIN_WARMUP_ROUNDS)
    first = (ours_call()[1], torch_call())
    # the same first step again (a fresh copy of the state: the step donates it)
    again = ours_call(jax.tree.map(jnp.copy, anchor.state), batch, anchor.frozen)[1]
    for _ in range(rounds - 1):
        ours_call()
        torch_call()
    ours_times, torch_times, sections = _CallTimes(), _CallTimes(), []
    for _ in range(max(repeats, 1)):
        ours_times.time(ours_call)
        timer = solver.SectionTimer(anchor.device)
        torch_times.time(torch_call, timer)
        sections.append(dict(timer.seconds))
    times = {**ours_times.record("ours"), **torch_times.record("torch")}
    _warn_faults(times)
    out = {"bench": "anchor_step", "strategy": cfg.strategy, "dtype": cfg.dtype,
           "image_size": cfg.image_size, "batch_size": cfg.batch_size,
           "targets": list(cfg.targets), "identity": cfg.identity,
           "lower_s": record["lower_s"], "compile_s": record["compile_s"], **times,
           "speedup": round(times["torch_step_s"] / times["ours_step_s"], 3),
           "speedup_min": round(times["torch_step_s_min"] / times["ours_step_s_min"], 3),
           "first_step_rel_err": _first_step_check(jax.device_get(first[0]), first[1],
                                                   cfg.targets),
           "ours_repeat_rel_err": _repeat_check(jax.device_get(first[0]),
                                                jax.device_get(again), cfg.targets),
           "load_average": _load_average(),
           "torch": torch.__version__, "torch_device": str(anchor.device),
           "torch_threads": torch.get_num_threads(), "repeats": max(repeats, 1),
           "warmup": rounds}
    _warn_repeat(out["ours_repeat_rel_err"])
    return out, sections


def _warn_repeat(repeat: dict) -> None:
    if any(v > 0 for v in repeat.values()):
        print(f"warning: our step gave different numbers on the same state and batch "
              f"(relative {repeat}): XLA:CPU's multi-threaded runtime is not deterministic "
              "here (jax-ml/jax#39741), so first_step_rel_err is one draw of several",
              file=sys.stderr)


# ------------------------------------------------------------------------------------------
# Timing: protection
# ------------------------------------------------------------------------------------------

def _protect_module(gcfg: GeneratorConfig, variables, delta_p):
    """generator.protect_eval: the generator module as trained, float32."""
    return jax.jit(functools.partial(protect_eval, config=gcfg, eps=gcfg.eps)), (variables,
                                                                                 delta_p)


def _protect_prepared(dtype: str):
    """protection.fast: BatchNorm folded at load time (not timed), computed in `dtype`."""
    def make(gcfg: GeneratorConfig, variables, delta_p):
        gen = fast.prepare(Generator(gcfg, variables, delta_p), dtype)
        fn = jax.jit(lambda layers, p, x: fast.protect_fast(layers, p, x, config=gcfg,
                                                            eps=gcfg.eps))
        return fn, (gen.layers, gen.delta_p)
    return make


# variant -> (generator config, variables, delta_p) -> (a jitted fn(*args, x (B,S,S,3)) ->
# x_adv float32, args): our protections; a variant's dtype is its name before any '-'.
OUR_PROTECTION: dict[str, Callable] = {
    "float32": _protect_module,
    "float32-folded": _protect_prepared("float32"),
    "bfloat16": _protect_prepared("bfloat16"),
}


def bench_protect(cfg: TrainConfig, batch: int, dtypes, repeats: int, warmup: int,
                  seed: int = 0) -> list[dict]:
    """Protection of one batch (eval mode): ours per dtype (OUR_PROTECTION) and the torch
    generator's forward (solver.TorchProtector: float32 and, with bfloat16, its autocast and
    cast variants), the same weights, round-robin. Records per variant: s_per_image and the
    ratios torch float32 / this, and, for ours, the best torch variant of its dtype / this."""
    from experiments import bench

    device = torch_device()
    gen = torch.Generator().manual_seed(seed)
    generator, prior, variables, delta_p = _generator_pair(cfg, gen, True, 1.0)
    generator.to(device)
    gcfg = cfg.generator
    x = np.random.default_rng(seed).uniform(-1, 1, (batch, gcfg.image_size, gcfg.image_size, 3)
                                            ).astype(np.float32)
    x_t = _nchw(x, device)
    variables, delta_p = _as_jax(variables), jnp.asarray(delta_p)
    calls = []   # (side, dtype, variant, call, record); torch float32 always (the baseline)
    for dtype in dtypes:
        variants = [v for v in OUR_PROTECTION if v.split("-")[0] == dtype]
        if not variants:
            raise ValueError(f"--dtypes {dtype}: no protection of ours for it")
        for variant in variants:
            fn, args = OUR_PROTECTION[variant](gcfg, variables, delta_p)
            record, call = bench.prepare(fn, (*args, jax.device_put(x)))
            calls.append(("ours", dtype, variant, call, record))
    for variant in solver.PROTECT_VARIANTS:
        dtype = variant.split("-")[0]
        if dtype == "float32" or dtype in dtypes:
            protector = solver.TorchProtector(generator, prior.to(device), gcfg.eps, variant)
            calls.append(("torch", dtype, variant,
                          functools.partial(_torch_protect_call, protector, x_t, device), {}))
    outputs = {}
    for side, dtype, variant, call, _ in calls:
        outputs[(side, dtype, variant)] = np.asarray(call())   # the first call warms caches
        for _ in range(max(warmup - 1, 0)):
            call()
    times = {i: [] for i in range(len(calls))}
    for _ in range(max(repeats, 1)):
        for i, (*_, call, _) in enumerate(calls):
            t = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - t)
    load = _load_average()
    per_image = {i: statistics.median(v) / batch for i, v in times.items()}
    torch32 = next(i for i, c in enumerate(calls) if c[0] == "torch" and c[2] == "float32")
    want = np.transpose(outputs[("torch", "float32", "float32")], (0, 2, 3, 1))
    out = []
    for i, (side, dtype, variant, _, record) in enumerate(calls):
        r = {"bench": "anchor_protect", "side": side, "dtype": dtype, "variant": variant,
             "image_size": gcfg.image_size, "batch_size": batch, "ngf": gcfg.ngf,
             "n_blocks": gcfg.n_blocks, "s_per_image": round(per_image[i], 6),
             "s_per_image_min": round(min(times[i]) / batch, 6),
             "torch_float32_over_this": round(per_image[torch32] / per_image[i], 3),
             "load_average": load, **record}
        got = outputs[(side, dtype, variant)]
        got = got if side == "ours" else np.transpose(got, (0, 2, 3, 1))
        r["max_abs_diff_vs_torch_float32"] = float(np.max(np.abs(got - want)))
        if side == "ours":
            same = [j for j, c in enumerate(calls) if c[0] == "torch" and c[1] == dtype]
            best = min(same, key=lambda j: per_image[j])
            r["best_torch_same_dtype"] = calls[best][2]
            r["best_torch_same_dtype_over_this"] = round(per_image[best] / per_image[i], 3)
        out.append(r)
    return out


def _torch_protect_call(protector, x_t, device):
    out = protector(x_t)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out.cpu()


# ------------------------------------------------------------------------------------------
# Per-component times
# ------------------------------------------------------------------------------------------

def _time_piece(name: str, fn, args: tuple, repeats: int, warmup: int) -> dict:
    from experiments import bench

    r = bench.measure(jax.jit(fn), args, 1, repeats, warmup)
    return {"piece": name, "step_s": r["step_s"], "step_s_min": r["step_s_min"],
            "compile_s": r["compile_s"], "flops": r["flops_per_step"]}


def our_components(anchor: Anchor, repeats: int, warmup: int) -> list[dict]:
    """Each named piece of our step (training/step.py) jitted ALONE at the step's shapes and
    timed (bench.measure). Rows, by 'kind': 'partition' (together the step): clean_pass,
    generator_pass (G's forward, keeping its vjp), target_gradients per target (one target's
    forward + backward, the identity network's included), weigh_tasks (G's backward(s) from
    that vjp and the solver), apply_gradients; 'inside' one of those: the targets chained as
    the step chains them, the identity network, its resize, the solver; 'extra': our
    Grad-CAM++ heatmap (not in our step: the data cache holds it)."""
    setup, state, frozen = anchor.setup, anchor.state, anchor.frozen
    inputs = train.read_batch(jax.device_put(anchor.batch))
    n, b = len(setup.targets), anchor.cfg.batch_size
    rows = []

    def piece(name, fn, *args, kind="partition"):
        rows.append({**_time_piece(name, fn, args, repeats, warmup), "kind": kind})

    piece("clean_pass", lambda fr, inp, s: train.clean_pass(setup, fr, inp, s), frozen, inputs,
          state.step)
    clean = jax.jit(lambda fr, inp, s: train.clean_pass(setup, fr, inp, s))(frozen, inputs,
                                                                             state.step)

    def gen_pass(st, x):
        g = train.generator_pass(setup, st, x)
        return g.images, g.vjp, g.batch_stats
    piece("generator_pass", gen_pass, state, inputs.x)
    (x_adv, x_pri), gen_vjp, _ = jax.jit(gen_pass)(state, inputs.x)

    for t, ct in zip(setup.targets, clean):
        def one_target(fr, inp, c, xa, xp, t=t):
            return jax.value_and_grad(lambda a, p: train.target_loss(setup, fr, inp, t, c, a, p),
                                      argnums=(0, 1), has_aux=True)(xa, xp)
        piece(f"target {t.name}", one_target, frozen, inputs, ct, x_adv, x_pri)

    def all_targets(fr, inp, c, xa, xp):
        return train.target_gradients(setup, fr, inp, c, xa, xp)
    piece("target_gradients (all, chained)", all_targets, frozen, inputs, clean, x_adv, x_pri,
          kind="inside")
    per = jax.jit(all_targets)(frozen, inputs, clean, x_adv, x_pri)

    ident = setup.identity
    outs = jax.random.uniform(jax.random.key(7), (2 * b,) + inputs.x.shape[1:], minval=-1,
                              maxval=1)
    piece(f"identity fwd+bwd ({2 * b} outputs, per target)",
          lambda fr, o: jax.grad(lambda v: jnp.sum(jnp.square(ident.features(fr, v))))(o),
          frozen.identity, outs, kind="inside")
    piece(f"identity forward (clean, {n * b} outputs)", lambda fr, o: ident.features(fr, o),
          frozen.identity, jnp.concatenate([outs[:b]] * n), kind="inside")
    piece(f"resize to the identity input fwd+bwd ({2 * b})",
          lambda o: jax.grad(lambda v: jnp.sum(jnp.square(ident.prepare(v))))(o), outs,
          kind="inside")

    def weigh(st, vjp, ga, gp, kpi):
        w, grads, _ = train.weigh_tasks(setup, st, vjp, ga, gp, kpi)
        return w, grads
    piece("weigh_tasks", weigh, state, gen_vjp, per.g_adv, per.g_pri, per.kpi)
    if setup.cfg.strategy == "mgda":
        per_task, _ = jax.jit(lambda v, ga, gp: jax.vmap(v)((ga, gp)))(gen_vjp, per.g_adv,
                                                                      per.g_pri)
        piece("solver (gram + min-norm)",
              lambda g: mgda.min_norm(mgda.gram_matrix(g), setup.cfg.mgda_solver), per_task,
              kind="inside")
    else:
        piece("solver (kpi weights)",
              lambda k, s: weights_from_values(setup.cfg.strategy, k, setup.alpha, s)[0],
              per.kpi, state.strategy_state, kind="inside")
    w, grads = jax.jit(weigh)(state, gen_vjp, per.g_adv, per.g_pri, per.kpi)
    gradients = train.Gradients(grads, state.batch_stats, state.strategy_state, w, {})
    piece("apply_gradients", lambda st, g: train.apply_gradients(setup, st, g), state,
          gradients)
    _, vgg_module, vgg_vars = anchor.vgg
    piece("Grad-CAM++ heatmap (not in our step: from the data cache)",
          lambda v, x: gradcam.heatmaps(vgg_module, v, x), vgg_vars, inputs.x, kind="extra")
    return rows


def torch_components(sections: list[dict]) -> list[dict]:
    """The reference step's sections (SectionTimer names), median seconds over the timed
    calls, in the order the step runs them."""
    names = list(dict.fromkeys(k for s in sections for k in s))
    return [{"section": k, "step_s": round(statistics.median(s.get(k, 0.0) for s in sections), 6)}
            for k in names]


# Rows of the side-by-side table: (label, our pieces, torch sections); a prefix ending in '*'
# sums every matching name.
def _rows(names: list[str]) -> list[tuple[str, list[str], list[str]]]:
    rows = [("Grad-CAM++ heatmap", ["Grad-CAM++ heatmap*"], ["gradcam"]),
            ("clean pass (targets, no grad)", ["clean_pass"], ["clean *"]),
            ("generator forward", ["generator_pass"], ["generator forward"])]
    rows += [(f"target {n}", [f"target {n}"], [f"forward {n}"]) for n in names]
    rows += [("identity network + resizes", ["identity fwd+bwd*", "identity forward*"],
              ["identity + resizes"]),
             ("losses", [], ["losses"]),
             ("per-target backward over G (MGDA)", [], ["autograd.grad *"]),
             ("backward over G (weigh_tasks) / total backward", ["weigh_tasks"], ["backward"]),
             ("solver", ["solver*"], ["solver"]),
             ("optimiser", ["apply_gradients"], ["optimizer"])]
    return rows


def _match(keys: list[str], values: dict[str, float]) -> float | None:
    """The sum of the values whose names match keys (a key ending in '*' is a prefix)."""
    hits = [v for name, v in values.items()
            if any(name == k or (k.endswith("*") and name.startswith(k[:-1])) for k in keys)]
    return sum(hits) if hits else None


def component_table(ours: list[dict], theirs: list[dict], names, strategy: str,
                    ours_step_s: float, torch_step_s: float) -> str:
    """Both sides' components side by side (seconds, medians); our pieces jitted alone, the
    torch sections timed inside its step. Our target rows are forward + backward (the
    identity network's included); the torch target rows are its forwards only (its backward
    is the 'total backward' row, and for MGDA also the per-target autograd.grad rows)."""
    ov = {r["piece"]: r["step_s"] for r in ours}
    kinds = {r["piece"]: r["kind"] for r in ours}
    tv = {r["section"]: r["step_s"] for r in theirs}
    lines = [f"components ({strategy}; seconds, median): ours (each piece jitted alone) | "
             f"PyTorch reference (sections of its step)",
             f"{'component':<52} {'ours':>12} {'torch':>10}"]
    marks = {"partition": "", "inside": " (in)", "extra": " (x)"}
    for label, ok, tk in _rows(list(names)):
        o, t = _match(ok, ov), _match(tk, tv)
        mark = ""
        if o is not None:
            mark = marks[next(kinds[p] for p in kinds if _match(ok, {p: 0.0}) is not None)]
        lines.append(f"{label:<52} {'-' if o is None else f'{o:.4f}{mark}':>12} "
                     f"{'-' if t is None else f'{t:.4f}':>10}")
    part = sum(r["step_s"] for r in ours if r["kind"] == "partition")
    lines.append(f"{'sum of our partition / of all torch sections':<52} {part:>12.4f} "
                 f"{sum(tv.values()):>10.4f}")
    chained = ov.get("target_gradients (all, chained)")
    if chained is not None:
        alone = sum(ov[f"target {n}"] for n in names)
        lines.append(f"our targets chained as in the step: {chained:.4f} s; each alone, summed: "
                     f"{alone:.4f} s")
    lines.append(f"{'whole step (the anchor timing)':<52} {ours_step_s:>12.4f} "
                 f"{torch_step_s:>10.4f}")
    lines.append("(in): inside a row of our partition, not in its sum; (x): not in our step (our "
                 "heatmaps(): the data cache holds the heatmap, the reference recomputes it "
                 "every step). Our target rows: forward + backward with the identity network; "
                 "torch's: its forwards (its backward is the total backward row).")
    return "\n".join(lines)
