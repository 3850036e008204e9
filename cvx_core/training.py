"""The CustomVideoX adapter training loop (DESIGN.md §1.4). Host-free.

The base model stays frozen; only the adapter's LoRA pairs train, on the reference branch. The
caller passes the model as a callable ``model_fn(x_t, t, text, reference, checkpointing) -> prediction``
(built on the host's patched model, see nodes/train_adapter.py) plus the model's :class:`Objective`
(its sigma table and what it predicts), device and dtype from the host's model management.

Loss: the model's own objective on the video tokens only (the model call returns the video frames; the
reference frames it inserts are sliced off), at a training timestep ``t`` (an index into the sigma table):

* ``v_prediction`` (CogVideoX): with ``a = 1 / (1 + sigma_t^2)``, ``x_t = sqrt(a) x0 + sqrt(1-a) eps`` and
  target ``v = sqrt(a) eps - sqrt(1-a) x0``;
* ``flow`` (Wan, rectified flow): ``x_t = (1 - sigma_t) x0 + sigma_t eps`` and target ``eps - x0``.

loss = MSE(model, target).
Random drops: the caption is replaced by the empty caption's embedding (classifier-free guidance
needs the unconditional branch), and [reconstructed] the reference by an all-zero latent (an
uninformative reference; dropping the reference entirely would leave a reference-only LoRA nothing
to learn from that step). The reference tokens get the timestep ``reference_timestep`` says, as
CustomVideoXApply's input of that name does at inference (two-way: "sampling" or "noised"); the value
is saved in the adapter's metadata.

All randomness (clip, timestep, noise, drops) comes from one CPU generator whose state is saved in
every checkpoint, so a resumed run continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dataset import CachedDataset
from .lora import DEFAULT_TARGETS, AdapterMeta, ReferenceLora, save_adapter
from .plots import loss_curve_png

log = logging.getLogger("customvideox")

# (x_t [1,C,T,H,W], t [1] (sigma table index), text [1,L,D], reference [1,C,F,h,w], gradient checkpointing)
# -> prediction [1,C,T,H,W]
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
CHECKPOINT_DIR = "checkpoints"
# CustomVideoXApply's reference_timestep values a two-way training step can honour.
TRAIN_REFERENCE_TIMESTEPS = ("sampling", "noised")


class TrainingError(ValueError):
    """A user-facing training problem."""


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 500
    learning_rate: float = 1e-4
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0
    reference_drop: float = 0.05
    text_drop: float = 0.1
    gradient_checkpointing: bool = True
    checkpoint_every: int = 100
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    timestep_min: int = 0
    timestep_max: int = 999
    reference_timestep: str = "sampling"

    def check(self) -> None:
        if self.steps < 1 or self.rank < 1 or self.learning_rate <= 0:
            raise TrainingError(f"steps, rank and learning_rate must be positive ({self.steps}, {self.rank}, "
                                f"{self.learning_rate})")
        if not 0 <= self.timestep_min <= self.timestep_max:
            raise TrainingError(f"timestep range {self.timestep_min}..{self.timestep_max} is empty")
        if self.reference_timestep not in TRAIN_REFERENCE_TIMESTEPS:
            raise TrainingError(f"reference_timestep {self.reference_timestep!r}: training runs the reference in "
                                f"two-way mode, which can honour {TRAIN_REFERENCE_TIMESTEPS} ('clean' needs the "
                                f"one-way reference pass)")
        for name in ("reference_drop", "text_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TrainingError(f"{name} must be in 0..1, got {getattr(self, name)}")

    def compatible(self) -> dict:
        """What a checkpoint must share with these settings to be resumed by them."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


@dataclass
class TrainResult:
    adapter_path: Path
    curve_path: Path
    losses: list[float]
    steps: int
    resumed_from: int = 0
    checkpoints: list[Path] = field(default_factory=list)


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, v)`` for DDPM v-prediction at ``alpha_cumprod`` (a scalar tensor)."""
    a = alpha_cumprod.to(torch.float64)
    sa, sb = a.sqrt().item(), (1 - a).sqrt().item()
    return sa * x0 + sb * noise, sa * noise - sb * x0


def flow_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, velocity)`` for rectified flow at ``sigma`` (a scalar tensor)."""
    s = sigma.to(torch.float64).item()
    return (1 - s) * x0 + s * noise, noise - x0


OBJECTIVES = ("v_prediction", "flow")


@dataclass(frozen=True)
class Objective:
    """What the model predicts (``kind``, one of :data:`OBJECTIVES`) and its sigma table (index = training
    timestep), as the host's model sampling defines them."""

    kind: str
    sigmas: torch.Tensor

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise TrainingError(f"training objective {self.kind!r} is not one of {OBJECTIVES}")

    def point(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, target)`` at training timestep ``t``."""
        sigma = self.sigmas[t]
        if self.kind == "flow":
            return flow_target(x0, noise, sigma)
        return v_target(x0, noise, (1.0 / (1.0 + sigma.double() ** 2)).float())


def _checkpoints(out_dir: Path) -> list[Path]:
    return sorted((out_dir / CHECKPOINT_DIR).glob("step_*.pt"))


def save_checkpoint(out_dir: Path, step: int, lora: ReferenceLora, optimizer: torch.optim.Optimizer,
                    losses: list[float], gen: torch.Generator, settings: TrainSettings) -> Path:
    path = out_dir / CHECKPOINT_DIR / f"step_{step:07d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"step": step, "lora": lora.state_dict(), "optimizer": optimizer.state_dict(), "losses": losses,
                "rng": gen.get_state(), "settings": settings.compatible()}, tmp)
    tmp.replace(path)
    return path


def train_adapter(settings: TrainSettings, data: CachedDataset, model_fn: ModelFn, lora: ReferenceLora,
                  objective: Objective, out_dir: str | Path, *, device: torch.device,
                  dtype: torch.dtype, base_model: str = "", adapter_name: str = "customvideox_adapter",
                  resume: bool = True, progress: Callable[[int, int, float], None] | None = None,
                  check_interrupt: Callable[[], None] | None = None) -> TrainResult:
    """Train ``lora`` (in place) and save it as ``out_dir/<adapter_name>.safetensors`` with metadata,
    plus ``loss.png`` and checkpoints every ``checkpoint_every`` steps under ``out_dir/checkpoints``.

    With ``resume``, the latest checkpoint in ``out_dir`` (same rank/alpha/targets) is loaded and the
    run continues from its step. ``progress(step, total, loss)`` is called after every step;
    ``check_interrupt()`` may raise to stop (the host's interrupt), a checkpoint is written first.
    """
    settings.check()
    if len(data) == 0:
        raise TrainingError("the dataset is empty")
    if settings.timestep_max >= len(objective.sigmas):
        raise TrainingError(f"timestep_max {settings.timestep_max} is past the model's {len(objective.sigmas)} "
                            f"training timesteps")
    out_dir = Path(out_dir)
    # The adapter trains in fp32 on the model's device; the delta is cast to the model's dtype per call.
    for p in lora.pairs.values():
        p.down = p.down.detach().to(device, torch.float32).requires_grad_(True)
        p.up = p.up.detach().to(device, torch.float32).requires_grad_(True)
        p._cache.clear()
    params = lora.parameters()
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed)
    losses: list[float] = []
    start = 0
    found = _checkpoints(out_dir) if resume else []
    if found:
        ck = torch.load(found[-1], map_location="cpu", weights_only=True)
        if ck["settings"] != settings.compatible():
            raise TrainingError(f"the checkpoint {found[-1]} was made with {ck['settings']}, not "
                                f"{settings.compatible()}: use another output folder or turn resume off")
        lora.load_state_dict(ck["lora"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["rng"])
        losses, start = list(ck["losses"]), int(ck["step"])
        log.info("CustomVideoX training: resumed from %s (step %d)", found[-1].name, start)
    objective = Objective(objective.kind, objective.sigmas.detach().cpu())
    saved: list[Path] = []
    step = start
    try:
        for step in range(start + 1, settings.steps + 1):
            if check_interrupt is not None:
                check_interrupt()
            sample = data[int(torch.randint(len(data), (1,), generator=gen))]
            t = int(torch.randint(settings.timestep_min, settings.timestep_max + 1, (1,), generator=gen))
            x0 = sample["latent"]
            noise = torch.randn(x0.shape, generator=gen)
            drop_ref, drop_text = torch.rand(2, generator=gen).tolist()
            x_t, target = objective.point(x0, noise, t)
            ref = sample["reference"]
            ref = torch.zeros_like(ref) if drop_ref < settings.reference_drop else ref
            text = data.empty_text if drop_text < settings.text_drop else sample["text"]
            pred = model_fn(x_t.to(device, dtype), torch.tensor([float(t)], device=device),
                            text.to(device, dtype), ref.to(device, dtype), settings.gradient_checkpointing)
            loss = torch.nn.functional.mse_loss(pred.float(), target.to(device, torch.float32))
            if not math.isfinite(loss.item()):
                raise TrainingError(f"the loss became {loss.item()} at step {step}: lower learning_rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            for p in lora.pairs.values():
                p._cache.clear()
            losses.append(loss.item())
            if progress is not None:
                progress(step, settings.steps, losses[-1])
            if settings.checkpoint_every > 0 and step % settings.checkpoint_every == 0:
                saved.append(save_checkpoint(out_dir, step, lora, opt, losses, gen, settings))
    except BaseException:
        if step > start and len(losses) == step:  # keep the finished steps of an interrupted run
            saved.append(save_checkpoint(out_dir, step, lora, opt, losses, gen, settings))
        raise
    for p in lora.pairs.values():
        p.down, p.up = p.down.detach().cpu(), p.up.detach().cpu()
        p._cache.clear()
    meta = AdapterMeta(rank=settings.rank, alpha=settings.alpha, targets=tuple(settings.targets),
                       base_model=base_model, steps=settings.steps,
                       extra={"final_loss": f"{sum(losses[-10:]) / max(1, len(losses[-10:])):.6g}",
                              "reference_timestep": settings.reference_timestep})
    adapter = save_adapter(out_dir / f"{adapter_name}.safetensors", lora, meta)
    curve = loss_curve_png(losses, out_dir / "loss.png")
    return TrainResult(adapter, curve, losses, settings.steps, start, saved)

