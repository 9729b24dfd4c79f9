"""Training configurations: runnable documentation of every knob.

`paper()` is the paper's setting (IV-A5: 256 px, eps 0.05, batch 32, Adam 1e-4, betas 0.5/0.999,
the five targets); `reference()` the released code's recipe (its `solver.py` and `config.py`:
batch 3, one epoch, MGDA, the soft JPEG masks). `demo()` is a few-minute CPU run with small
randomly initialised targets: it shows the machinery working, not the paper's numbers;
`offline()` is the demo with face models trained here (`networks.learned`) as its targets. Change a
field with dataclasses.replace or `--set field=value` on experiments/train.py.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from idguard_jax.channels import parse_spec
from idguard_jax.data.celebamask import MASK_PIPELINES
from idguard_jax.data.datasets import FOLDER_MASKS
from idguard_jax.generator import GeneratorConfig
from idguard_jax.networks.learned import LEARNED_TARGETS
from idguard_jax.networks.targets import PRIOR_WEIGHTS
from idguard_jax.training.losses import LossConfig
from idguard_jax.training.strategies import STRATEGIES

__all__ = ["TrainConfig", "paper", "reference", "demo", "offline", "tiny", "apply_overrides"]

DTYPES = ("float32", "bfloat16")
TARGET_SIZES = ("official", "demo", "tiny")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; `paper()`, `demo()` and `tiny()` below are its presets."""
    # data and budget
    image_size: int = 256             # side of the aligned faces, px
    batch_size: int = 32              # global batch (split over devices)
    num_steps: int | None = None      # None: one epoch over the training images (the reference)
    seed: int = 0                     # data order, initialisation and random targets
    # the generator and the perturbation budget (L-inf, in [-1, 1] units)
    ngf: int = 64                     # generator width (the official 64)
    n_blocks: int = 6                 # generator residual blocks (the official 6)
    eps: float = 0.05                 # L-inf budget in [-1, 1] units (6 grey levels at 0.05)
    # what is attacked
    targets: tuple[str, ...] = ("stargan", "aggan", "fpgan", "relgan", "hisd")  # networks.targets
    target_size: str = "official"     # 'official', or the narrow random 'demo' / 'tiny' variants
    all_conditions: bool = False      # every condition each step instead of step mod count
    # network of the identity loss: 'auto' = a converted ArcFace (the reference's) if present,
    # else dlib's (offline, real); or any name in idguard_jax.networks.identity.IDENTITY_NETS
    identity: str = "auto"
    identity_config: tuple[tuple[str, Any], ...] = ()   # (field, value) architecture overrides
    identity_normalisation: str = "reference"   # 'reference' (what ID-Guard feeds) or 'trained'
    loss: LossConfig = LossConfig()   # mask mode and term weights (`--set loss.FIELD=...`)
    # masks the data must hold: 'exact' binary, or the reference's soft JPEG + bilinear masks
    # (data.celebamask.MASK_PIPELINES; a cache of the other pipeline is refused)
    mask_pipeline: str = "exact"
    # masks of a plain folder of aligned faces (a cache has its own): 'box' (stand-in central
    # box) or 'landmarks' (dlib's 68 landmarks' components; data.datasets.folder_dataset)
    folder_masks: str = "box"
    # how the per-target losses are weighted
    strategy: str = "kpi"             # training.strategies.STRATEGIES
    prior_weights: str = "reference"  # 'reference' 1/10/1/10/100, 'paper' 1/1/1/10/100, 'none' 1s
    mgda_solver: str = "reference"    # 'reference' (its projected-gradient algorithm) or 'exact'
    mgda_gradients: str = "params"    # 'params' (the reference) or 'perturbation' (MGDA-UB)
    # expectation over lossy channels (channels.parse_spec), e.g.
    # 'jpeg:70-95,resize:0.5-1,blur:0-1': per step and image one channel (drawn from the seed and
    # the step) between G and the targets; '' (the reference) trains on the clean channel
    robust: str = ""
    # optimiser (Adam on G's parameters and delta_p together)
    learning_rate: float = 1e-4
    b1: float = 0.5
    b2: float = 0.999
    # numerics
    dtype: str = "float32"            # compute dtype; master weights stay float32
    # bookkeeping
    log_every: int = 1                # steps between JSON metric lines
    checkpoint_every: int = 500       # steps between Orbax checkpoints (and at the end)
    max_to_keep: int = 3              # checkpoints kept in WORKDIR/checkpoints

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.prior_weights not in PRIOR_WEIGHTS:
            raise ValueError(f"prior_weights={self.prior_weights!r}: choose one of "
                             f"{', '.join(PRIOR_WEIGHTS)}")
        if self.mask_pipeline not in MASK_PIPELINES:
            raise ValueError(f"mask_pipeline={self.mask_pipeline!r}: choose one of "
                             f"{', '.join(MASK_PIPELINES)}")
        if self.folder_masks not in FOLDER_MASKS:
            raise ValueError(f"folder_masks={self.folder_masks!r}: choose one of "
                             f"{', '.join(FOLDER_MASKS)}")
        if self.mgda_solver not in ("reference", "exact"):
            raise ValueError(f"mgda_solver={self.mgda_solver!r}: 'reference' or 'exact'")
        if self.mgda_gradients not in ("params", "perturbation"):
            raise ValueError(f"mgda_gradients={self.mgda_gradients!r}: 'params' or 'perturbation'")
        if self.robust:
            parse_spec(self.robust)       # ValueError naming robust= and the part at fault
        if self.target_size not in TARGET_SIZES:
            raise ValueError(f"target_size={self.target_size!r}: choose one of {', '.join(TARGET_SIZES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.image_size % 4:
            raise ValueError(f"image_size={self.image_size}: must be a multiple of 4")
        if not self.targets:
            raise ValueError("targets: name at least one target")

    @property
    def generator(self) -> GeneratorConfig:
        return GeneratorConfig(ngf=self.ngf, n_blocks=self.n_blocks, image_size=self.image_size,
                               eps=self.eps)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))


def paper(**overrides) -> TrainConfig:
    """The paper's setting (IV-A5). Needs converted target and ArcFace weights and the data."""
    return TrainConfig(**overrides)


def reference(**overrides) -> TrainConfig:
    """The released code's recipe (its `config.py` and `solver.py`): batch 3 for one epoch, MGDA
    (its default `dws`), its soft JPEG + bilinear masks (build the cache with `prepare.py
    celebamask-hq --masks reference`); everything else as paper(). One epoch is 29,000 // 3 =
    9,666 steps here (the last partial batch is dropped), 9,667 in the reference; its fp16
    autocast + GradScaler has no equivalent here (`dtype='bfloat16'` is the nearest)."""
    base = dict(batch_size=3, num_steps=None, strategy="mgda", mask_pipeline="reference")
    return TrainConfig(**{**base, **overrides})


def demo(**overrides) -> TrainConfig:
    """A CPU demo of a few minutes: 64 px, batch 4, the five targets small and RANDOM (no
    target weights exist offline); the real parts that do: dlib's face recognition network in
    the identity loss and masks from dlib's 68 landmarks. 40 steps (120 with the stand-in
    identity network; dlib's 150 px chips cost ~3 s a step on 2 cores). Not the paper's numbers."""
    base = dict(image_size=64, batch_size=4, num_steps=40, ngf=16, n_blocks=2,
                target_size="demo", identity="dlib", folder_masks="landmarks",
                checkpoint_every=20, log_every=1)
    return TrainConfig(**{**base, **overrides})


def offline(**overrides) -> TrainConfig:
    """demo() with no random network in the loop: its targets are the face models trained here on
    the shared faces' training identities (`networks.learned.LEARNED_TARGETS`, made by
    `experiments/offline.py target`), with dlib's identity loss and landmark masks. 300 steps
    at Adam lr 1e-3 (10x the paper's: minutes, not epochs; ~1.4 s a step on 2 cores). A learned
    face model, not the paper's GANs."""
    base = dict(targets=LEARNED_TARGETS, target_size="official", num_steps=300,
                learning_rate=1e-3, checkpoint_every=100)
    return demo(**{**base, **overrides})


def tiny(**overrides) -> TrainConfig:
    """The smallest configuration, for tests: 32 px, batch 2, narrow networks."""
    base = dict(image_size=32, batch_size=2, num_steps=2, ngf=4, n_blocks=1,
                target_size="tiny", identity="standin",
                identity_config=(("width", 4),), checkpoint_every=1000)
    return TrainConfig(**{**base, **overrides})


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(current, int) or current is None and text.isdigit():
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple):
        return tuple(s for s in text.split(",") if s)
    return text


def apply_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
    """Apply 'field=value' strings (e.g. from --set). Errors name the field."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    changes = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        key, text = item.split("=", 1)
        if key.startswith("loss."):
            sub = key[5:]
            loss_fields = {f.name for f in dataclasses.fields(LossConfig)}
            if sub not in loss_fields:
                raise ValueError(f"--set {key}: unknown loss field (known: {', '.join(sorted(loss_fields))})")
            loss = changes.get("loss", cfg.loss)
            changes["loss"] = dataclasses.replace(loss, **{sub: _parse_value(text, getattr(loss, sub))})
            continue
        if key not in fields or key == "identity_config":
            raise ValueError(f"--set {key}: unknown or unsupported field (known: {', '.join(sorted(fields))})")
        try:
            changes[key] = _parse_value(text, getattr(cfg, key))
        except ValueError as e:
            raise ValueError(f"--set {key}: {e}") from e
    return dataclasses.replace(cfg, **changes)
