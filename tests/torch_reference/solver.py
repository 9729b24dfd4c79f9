"""ID-Guard's train step in eager PyTorch, with the reference's structure (the reference's
`solver.py::train_batch`, `advGen.py::advGenerator.generate`, `deepfake.py::DeepfakeHandler`,
`strategy/KPI.py`, `strategy/MGDA.py` + `strategy/MinNorm.py`), written from the facts; and the
protection forward (the generator in eval mode). The anchor our step is measured and checked
against (experiments/anchor.py, tests/test_anchor.py).

One step, as the reference takes it:
  1. Grad-CAM++ heatmap of the clean batch through VGGFace (pytorch-grad-cam 1.4.8's maths, as
     `solver.heatmap` runs it: a no-grad forward for the classes, then a forward and a backward
     that also fills VGGFace's parameter gradients), detached;
  2. x_adv, x_pri from the generator in train mode (BatchNorm on batch statistics);
  3. per target (condition = step mod its count): the clean output and the clean mid features
     (no grad, two target calls), then for each branch the target run TWICE (output, then mid
     features), and the identity network on the resized clean output once per branch and on each
     resized adversarial output; loss = 1.0 mask + 0.1 identity + 0.01 feature per branch;
     MGDA: one `torch.autograd.grad` of the target's loss over G's parameters;
  4. the weights: KPI (prior x focal weight of the mask losses) or MGDA (min-norm, NumPy);
  5. G_loss = -sum_k loss_k * prior_k * weight_k, one backward through everything, Adam.
On CUDA steps 2-4 run under fp16 autocast with a GradScaler (the reference's numerics); on the
CPU in float32 (the reference's autocast is CUDA's, a no-op there).

Tensors are NCHW; images in [-1, 1].
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections import defaultdict
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# MinNormSolver (float64 NumPy); upstream has no effective iteration cap (its counter never
# moves): min_norm_weights' cap only stops a loop that would never end.
from min_norm_reference import min_norm_weights

from .stargan import manipulate as stargan_manipulate
from .vggface import VggFace, denorm, resize_image

__all__ = ["TorchTarget", "TorchIdentity", "SectionTimer", "LossWeights", "StepOutput",
           "ReferenceStep", "TorchProtector", "PROTECT_VARIANTS", "gradcam_plusplus",
           "gram_matrix", "min_norm_weights", "kpi_weights", "create_labels", "RELGAN_VECTORS"]

# ID-Guard's RelGAN relative attribute vectors (`deepfake.py::process_ref`).
RELGAN_VECTORS = ((0, 0, 0, 1, 0), (0, -1, 0, 0, 0), (-1, 0, 0, 0, 0), (0, 0, 0, -1, 0),
                  (0, 0, 0, 0, -1))
_HAIR = (0, 1, 2)   # Black_Hair, Blond_Hair, Brown_Hair in the 5 StarGAN attributes

# pytorch-grad-cam 1.4.8's constants
_ALPHA_EPS = 1e-6
_NORM_EPS = 1e-7
_CAM_SIZE = 224



# ------------------------------------------------------------------------------------------
# Targets and the identity network, as the reference calls them
# ------------------------------------------------------------------------------------------

def create_labels(labels: torch.Tensor) -> list[torch.Tensor]:
    """The 5 target label vectors (each (B, 5)) of the reference's `utils.create_labels`: a hair
    colour set to 1 with the other hair colours 0, or Male / Young flipped."""
    out = []
    for i in range(labels.shape[1]):
        c = labels.clone()
        if i in _HAIR:
            c[:, list(_HAIR)] = 0
            c[:, i] = 1
        else:
            c[:, i] = (c[:, i] == 0).to(c.dtype)
        out.append(c)
    return out


class TorchTarget:
    """One target network as `deepfake.py::DeepfakeHandler` drives it.

    kind: 'stargan' | 'aggan' | 'fpgan' (torch_reference.stargan.Generator), 'relgan'
    (torch_reference.relgan.G, eval mode), 'hisd' (torch_reference.hisd.Gen; `references`
    (R, 3, S, S) and `hisd_conditions` [(reference index, tag), ...] give its conditions).
    Parameters never need gradients (the reference sets requires_grad False).
    """

    def __init__(self, name: str, kind: str, module: nn.Module,
                 references: torch.Tensor | None = None,
                 hisd_conditions: Sequence[tuple[int, int]] = ()):
        self.name, self.kind, self.module = name, kind, module
        for p in module.parameters():
            p.requires_grad_(False)
        if kind == "relgan":
            module.eval()   # the reference: "only relgan need .eval()"
        self.references = references
        self.hisd_conditions = tuple(hisd_conditions)
        if kind == "hisd" and (references is None or not self.hisd_conditions):
            raise ValueError("a HiSD target needs its reference images and conditions")

    def to(self, device) -> "TorchTarget":
        self.module.to(device)
        if self.references is not None:
            self.references = self.references.to(device)
        return self

    def conditions(self, labels: torch.Tensor) -> list:
        """`process_ref`: every condition of this batch, in the reference's order."""
        if self.kind in ("stargan", "aggan", "fpgan"):
            return create_labels(labels)
        if self.kind == "relgan":
            return [torch.tensor(v, dtype=labels.dtype, device=labels.device)[None]
                    for v in RELGAN_VECTORS]
        return [(tag, self.references[r][None]) for r, tag in self.hisd_conditions]

    def manipulate(self, x: torch.Tensor, cond) -> torch.Tensor:
        if self.kind in ("stargan", "aggan", "fpgan"):
            return stargan_manipulate(self.module, x, cond)
        if self.kind == "relgan":
            return self.module(x, cond.repeat(x.size(0), 1))
        tag, reference = cond
        return self.module.reference_guided(x, reference, tag)

    def get_feature(self, x: torch.Tensor, cond) -> torch.Tensor:
        """The mid features from a SECOND call of the target's first half (`get_feature`)."""
        if self.kind in ("stargan", "aggan", "fpgan"):
            return self.module.mid_features(x, cond)
        if self.kind == "relgan":
            return self.module.mid_features(x, cond.repeat(x.size(0), 1))
        return self.module.encode(x)


@dataclasses.dataclass
class TorchIdentity:
    """The identity network of the loss: resize (align corners) to `input_size`, then
    `features` (ArcFace's bn2 map at 112, VGGFace's conv5 map at 224 after its denorm, ...)."""
    module: nn.Module
    input_size: int

    def __post_init__(self):
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def features(self, resized: torch.Tensor) -> torch.Tensor:
        return self.module.features(resized)


# ------------------------------------------------------------------------------------------
# Grad-CAM++ (pytorch-grad-cam 1.4.8 on VGGFace's conv5, as `solver.heatmap` runs it)
# ------------------------------------------------------------------------------------------

def _vgg_classify(vgg: VggFace, conv5: torch.Tensor) -> torch.Tensor:
    """VGGFace's logits from its conv5 map (eval mode: dropout is the identity)."""
    h = vgg.dropout(F.relu(vgg.fc1(conv5.flatten(1))))
    return vgg.fc3(vgg.dropout(F.relu(vgg.fc2(h))))


def _min_max(cam: torch.Tensor) -> torch.Tensor:
    """scale_cam_image per image (B, H, W): -min, then / (max + 1e-7)."""
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    return cam / (_NORM_EPS + cam.amax(dim=(1, 2), keepdim=True))


def gradcam_plusplus(vgg: VggFace, x_real: torch.Tensor) -> torch.Tensor:
    """The reference's heatmap: (B, 3, S, S) in [-1, 1] -> (B, 3, S, S) in [0, 1], detached.

    VGGFace's parameters require gradients during the CAM (as the reference sets them), so its
    backward also computes their gradients (never used), as pytorch-grad-cam's does."""
    vgg.eval()
    for p in vgg.parameters():
        p.requires_grad_(True)
    resized = resize_image(denorm(x_real), _CAM_SIZE)
    with torch.no_grad():   # the reference's forward for the predicted classes
        classes = vgg(resized).argmax(dim=1)
    activations = vgg.features(resized)          # conv5, after its max pool (B, C, 7, 7)
    activations.retain_grad()
    logits = _vgg_classify(vgg, activations)
    vgg.zero_grad()
    logits.gather(1, classes[:, None]).sum().backward()
    a, g = activations.detach(), activations.grad
    for p in vgg.parameters():
        p.requires_grad_(False)
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + _ALPHA_EPS)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    weights = (F.relu(g) * alpha).sum(dim=(2, 3))
    cam = F.relu((weights[:, :, None, None] * a).sum(dim=1))
    # cv2.resize INTER_LINEAR enlarging = bilinear with half-pixel centres (align_corners False)
    cam = F.interpolate(_min_max(cam)[:, None], size=(_CAM_SIZE, _CAM_SIZE), mode="bilinear",
                        align_corners=False)[:, 0]
    cam = _min_max(F.relu(cam))   # the aggregation over target layers (one)
    return resize_image(cam[:, None].repeat(1, 3, 1, 1), x_real.shape[2]).detach()


# ------------------------------------------------------------------------------------------
# Task weights: KPI and MGDA's min-norm solver (NumPy, float64)
# ------------------------------------------------------------------------------------------

def kpi_weights(mask_losses: dict[str, float], tau: float = 1.0) -> dict[str, float]:
    """`update_KPI`: -(1 - K)^tau log K per target, K = clamp(mask loss sum, 1e-13, 1)."""
    out = {}
    for name, value in mask_losses.items():
        k = min(max(float(value), 1e-13), 1.0)
        out[name] = float(-((1.0 - k) ** tau) * np.log(k))
    return out


def gram_matrix(task_grads: Sequence[Sequence[torch.Tensor]]) -> np.ndarray:
    """M_ij = <g_i, g_j>: per parameter tensor a float32 sum of products, accumulated in
    float64 (MinNormSolver's dot products)."""
    n = len(task_grads)
    m = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            m[i, j] = m[j, i] = sum(float(torch.sum(a * b))
                                    for a, b in zip(task_grads[i], task_grads[j]))
    return m


# ------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------

class SectionTimer:
    """Wall time per named section of the step (time.perf_counter; CUDA synchronised), summed
    over repeated entries of one step."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t


@contextlib.contextmanager
def _untimed(name: str):
    yield


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The reference's lambda_mask / lambda_id / lambda_ft."""
    mask: float = 1.0
    identity: float = 0.1
    feature: float = 0.01


@dataclasses.dataclass
class StepOutput:
    """What one step computed (floats), per target name."""
    losses: dict            # loss_k (both branches' totals)
    terms: dict             # {'mask_adv', 'id_adv', 'feat_adv', 'mask_pri', ...}
    kpi: dict               # both branches' mask losses
    weights: dict           # the effective lambda_k = prior_k * dynamic weight_k
    objective: float        # sum_k lambda_k loss_k
    heatmap: torch.Tensor   # (B, 3, S, S)


class ReferenceStep:
    """The reference's `Solver.train_batch` on given networks.

    generator: torch_reference.advgen.ResnetGenerator (trained, train mode); prior: the prior
    perturbation (1, 3, S, S) (clamped to +-eps here, as `advGen.py` does when loading it);
    prior_weights: target name -> prior weight (the reference's configs/prior_weight.json
    entry: all 1 under MGDA). Adam(lr, betas) over G's parameters and the prior, maximising.
    """

    def __init__(self, generator: nn.Module, prior: torch.Tensor, targets: Sequence[TorchTarget],
                 identity: TorchIdentity, vggface: VggFace, *, strategy: str = "kpi",
                 prior_weights: dict[str, float] | None = None, eps: float = 0.05,
                 lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.999),
                 loss: LossWeights = LossWeights(), mask_mode: str = "multi",
                 device: torch.device | str = "cpu"):
        if strategy not in ("kpi", "mgda"):
            raise ValueError(f"strategy {strategy!r}: the reference weighs by 'kpi' or 'mgda'")
        self.device = torch.device(device)
        self.generator = generator.to(self.device)
        self.prior = prior.detach().clamp(-eps, eps).to(self.device).requires_grad_(True)
        self.targets = [t.to(self.device) for t in targets]
        self.identity = identity
        identity.module.to(self.device)
        self.vggface = vggface.to(self.device)
        self.strategy, self.eps, self.loss, self.mask_mode = strategy, eps, loss, mask_mode
        self.prior_weights = {t.name: 1.0 for t in targets} if strategy == "mgda" or \
            prior_weights is None else dict(prior_weights)
        self.optimizer = torch.optim.Adam(list(self.generator.parameters()) + [self.prior],
                                          lr=lr, betas=betas)
        # The reference's numerics on CUDA: fp16 autocast and a gradient scaler.
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.iter = 0

    # -- pieces -----------------------------------------------------------------------------

    def heatmap(self, x_real: torch.Tensor) -> torch.Tensor:
        return gradcam_plusplus(self.vggface, x_real)

    def generate(self, x_real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`advGenerator.generate`: (x_adv, x_pri)."""
        p = torch.clamp(self.prior, -self.eps, self.eps)
        x_cat = torch.cat([x_real, p.repeat(x_real.size(0), 1, 1, 1)], 1)
        pert = torch.clamp(self.generator(x_cat), -self.eps, self.eps)
        return torch.clamp(x_real + pert, -1.0, 1.0), torch.clamp(x_real + p, -1.0, 1.0)

    def _mask_loss(self, o, o_adv, mask, hmp):
        if self.mask_mode == "multi":
            return F.mse_loss(o * mask * hmp, o_adv * mask * hmp)
        if self.mask_mode == "add":
            return F.mse_loss(o * mask, o_adv * mask) + F.mse_loss(o * hmp, o_adv * hmp)
        if self.mask_mode == "bin":
            return F.mse_loss(o * mask, o_adv * mask)
        if self.mask_mode == "hmp":
            return F.mse_loss(o * hmp, o_adv * hmp)
        raise ValueError(f"mask mode {self.mask_mode!r}")

    def _branch(self, o, o_adv, f, f_adv, id_clean, id_adv, mask, hmp) -> dict:
        """`adv_loss`: one branch's mask, identity and feature losses and their total."""
        lm = self._mask_loss(o, o_adv, mask, hmp)
        li = -torch.mean(F.cosine_similarity(id_clean, id_adv))
        m = resize_image(mask[:, :1].repeat(1, f.size(1), 1, 1), f.size(2))
        lf = F.mse_loss(f * m, f_adv * m)
        total = self.loss.mask * lm + self.loss.identity * li + self.loss.feature * lf
        return {"mask": lm, "id": li, "feat": lf, "total": total}

    def _target_loss(self, t: TorchTarget, cond, x_real, x_adv, x_pri, mask, hmp, timer):
        """One target's loss_k and both branches' terms, the reference's calls in its order."""
        with timer(f"clean {t.name}"), torch.no_grad():
            o = t.manipulate(x_real, cond)
            f = t.get_feature(x_real, cond)
        with timer(f"forward {t.name}"):
            o_adv = t.manipulate(x_adv, cond)
            o_pri = t.manipulate(x_pri, cond)
            f_adv = t.get_feature(x_adv, cond)
            f_pri = t.get_feature(x_pri, cond)
        with timer("identity + resizes"):
            size = self.identity.input_size
            r_o, r_adv, r_pri = (resize_image(v, size) for v in (o, o_adv, o_pri))
            ids_adv = (self.identity.features(r_o), self.identity.features(r_adv))
            ids_pri = (self.identity.features(r_o), self.identity.features(r_pri))
        with timer("losses"):
            adv = self._branch(o, o_adv, f, f_adv, *ids_adv, mask, hmp)
            pri = self._branch(o, o_pri, f, f_pri, *ids_pri, mask, hmp)
        return adv["total"] + pri["total"], adv, pri

    # -- the step ---------------------------------------------------------------------------

    def train_batch(self, x_real: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                    timer: Callable = _untimed) -> StepOutput:
        """One step on x_real (B, 3, S, S) in [-1, 1], mask (B, 3, S, S) in [0, 1], labels
        (B, 5); `timer(name)` (a SectionTimer) times each section. Leaves the gradients of
        G_loss in the parameters' .grad (and Adam's state after its step)."""
        self.generator.train()
        with timer("gradcam"):
            hmp = self.heatmap(x_real)
        losses, branches, kpi, grads = {}, {}, {}, {}
        params = list(self.generator.parameters())
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            with timer("generator forward"):
                x_adv, x_pri = self.generate(x_real)
            for t in self.targets:
                conditions = t.conditions(labels)
                cond = conditions[self.iter % len(conditions)]
                loss_k, adv, pri = self._target_loss(t, cond, x_real, x_adv, x_pri, mask, hmp,
                                                     timer)
                losses[t.name], branches[t.name] = loss_k, (adv, pri)
                kpi[t.name] = adv["mask"].item() + pri["mask"].item()
                if self.strategy == "mgda":
                    with timer(f"autograd.grad {t.name}"):
                        g = torch.autograd.grad(loss_k, params, retain_graph=True,
                                                allow_unused=True)
                        grads[t.name] = [gi.detach().clone() if gi is not None
                                         else torch.zeros_like(p) for gi, p in zip(g, params)]
            with timer("solver"), torch.no_grad():
                if self.strategy == "mgda":
                    sol = min_norm_weights(gram_matrix(list(grads.values())))
                    dynamic = {name: float(w) for name, w in zip(grads, sol)}
                else:
                    dynamic = kpi_weights(kpi)
            weights = {n: self.prior_weights[n] * dynamic[n] for n in losses}
            total = sum(losses[n] * weights[n] for n in losses)
        with timer("backward"):
            self.optimizer.zero_grad()
            g_loss = -total
            if self.scaler is not None:
                self.scaler.scale(g_loss).backward()
            else:
                g_loss.backward()
        with timer("optimizer"):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.iter += 1
        terms = {n: {f"{k}_{branch}": d[k].item() for branch, d in zip(("adv", "pri"), pair)
                     for k in ("mask", "id", "feat")} for n, pair in branches.items()}
        return StepOutput(losses={n: v.item() for n, v in losses.items()}, terms=terms,
                          kpi=kpi, weights=weights, objective=total.item(), heatmap=hmp)


# ------------------------------------------------------------------------------------------
# Protection (the generator in eval mode)
# ------------------------------------------------------------------------------------------

# float32; bfloat16 under CPU/CUDA autocast; the generator and inputs cast to bfloat16.
PROTECT_VARIANTS = ("float32", "bfloat16-autocast", "bfloat16-cast")


class TorchProtector:
    """The reference's protection (`advGenerator.generate` with the generator in eval mode, as
    its test() calls it): x (B, 3, S, S) float32 in [-1, 1] -> x_adv float32."""

    def __init__(self, generator: nn.Module, prior: torch.Tensor, eps: float = 0.05,
                 variant: str = "float32"):
        if variant not in PROTECT_VARIANTS:
            raise ValueError(f"protection variant {variant!r}: one of {PROTECT_VARIANTS}")
        self.variant, self.eps = variant, eps
        self.generator = copy.deepcopy(generator).eval()
        for p in self.generator.parameters():
            p.requires_grad_(False)
        self.prior = prior.detach().clamp(-eps, eps)
        if variant == "bfloat16-cast":
            self.generator.to(torch.bfloat16)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prior.to(x.device)
        x_cat = torch.cat([x, p.repeat(x.size(0), 1, 1, 1)], 1)
        if self.variant == "bfloat16-cast":
            g = self.generator(x_cat.to(torch.bfloat16)).float()
        else:
            with torch.autocast(x.device.type, dtype=torch.bfloat16,
                                enabled=self.variant == "bfloat16-autocast"):
                g = self.generator(x_cat).float()
        return torch.clamp(x + torch.clamp(g, -self.eps, self.eps), -1.0, 1.0)
