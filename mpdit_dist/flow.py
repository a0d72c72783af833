"""Flow matching as in the MPDiT paper and official code (``otflow.py``).

Convention (DESIGN.md): ``x_t = (1 - t) x + t * noise``; t = 1 is pure noise; the model predicts
the velocity ``noise - x``; sampling integrates dx/dt = v from t = 1 down to t = 0. The null class
for classifier-free guidance is ``num_classes``.

Randomness is drawn for the *global* batch from a generator keyed by (seed, step) and each rank
takes its slice, so the same run on 1 or N ranks sees the same t, noise and class dropout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("euler", "heun", "dopri5", "euler_maruyama")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "decreasing", "increasing-decreasing")


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x


@dataclass
class FlowDraw:
    """The random part of one training step: times, noise and the class-dropout mask."""

    t: torch.Tensor  # (N,)
    noise: torch.Tensor  # (N, C, H, W)
    drop: torch.Tensor  # (N,) bool

    def slice(self, start: int, stop: int) -> "FlowDraw":
        return FlowDraw(self.t[start:stop], self.noise[start:stop], self.drop[start:stop])

    def to(self, device) -> "FlowDraw":
        return FlowDraw(self.t.to(device), self.noise.to(device), self.drop.to(device))


class FlowMatching:
    """Training objective: time sampling, interpolant, loss weighting, class dropout."""

    def __init__(
        self,
        num_classes: int,
        time_sampler: str = "lognormal",
        p_mean: float = 0.0,
        p_std: float = 1.0,
        loss_weighting: str = "uniform",
        class_dropout: float = 0.1,
    ):
        if time_sampler not in ("lognormal", "uniform"):
            raise ValueError(f"flow.time_sampler={time_sampler!r}: choose lognormal or uniform")
        if loss_weighting not in ("uniform", "snr", "min_snr"):
            raise ValueError(f"flow.loss_weighting={loss_weighting!r}: choose uniform, snr or min_snr")
        self.num_classes = num_classes
        self.time_sampler = time_sampler
        self.p_mean = p_mean
        self.p_std = p_std
        self.loss_weighting = loss_weighting
        self.class_dropout = class_dropout

    @classmethod
    def from_config(cls, fcfg, num_classes: int) -> "FlowMatching":
        return cls(
            num_classes=num_classes,
            time_sampler=fcfg.time_sampler,
            p_mean=fcfg.p_mean,
            p_std=fcfg.p_std,
            loss_weighting=fcfg.loss_weighting,
            class_dropout=fcfg.class_dropout,
        )

    def sample_t(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        if self.time_sampler == "uniform":
            return torch.rand(n, generator=generator, device=device)
        # logit-normal: sigmoid of N(p_mean, p_std^2)
        return torch.sigmoid(torch.randn(n, generator=generator, device=device) * self.p_std + self.p_mean)

    def draw(self, n: int, sample_shape: Sequence[int], generator: torch.Generator, device=None) -> FlowDraw:
        """Randomness for ``n`` samples, in a fixed order (t, noise, dropout) from ``generator``."""
        t = self.sample_t(n, generator, device)
        noise = torch.randn((n, *sample_shape), generator=generator, device=device)
        drop = torch.rand(n, generator=generator, device=device) < self.class_dropout
        return FlowDraw(t, noise, drop)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        if self.loss_weighting == "snr":
            return t / ((1 - t) + 1e-8)
        if self.loss_weighting == "min_snr":
            return torch.clamp(t / ((1 - t) + 1e-6), max=3.0)
        return torch.ones_like(t)

    def per_sample_loss(self, model: VelocityFn, x: torch.Tensor, y: torch.Tensor, draw: FlowDraw) -> torch.Tensor:
        """(N,) weighted mean-squared velocity error, the official ``l2`` loss before the batch mean."""
        x_t = interpolate(x, draw.noise.to(x.dtype), draw.t)
        y = torch.where(draw.drop, torch.full_like(y, self.num_classes), y)
        pred = model(x_t, draw.t, y)
        err = (pred.float() - velocity_target(x, draw.noise).float()) ** 2
        return err.flatten(1).mean(dim=1) * self.weight(draw.t)


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance and samplers
# ------------------------------------------------------------------------------------------------

def guided_velocity(
    model: VelocityFn,
    num_classes: int,
    cfg_scale: float = 1.0,
    guidance_interval: Optional[tuple[float, float]] = None,
) -> VelocityFn:
    """Wrap ``model`` with classifier-free guidance ``v_u + s (v_c - v_u)``.

    At scale 1 the conditional model is called alone. With ``guidance_interval=(lo, hi)``
    guidance applies only for lo <= t <= hi (the conditional model elsewhere).
    """

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if cfg_scale == 1.0:
            return model(x, t, y)
        if guidance_interval is not None:
            lo, hi = guidance_interval
            t0 = float(t.flatten()[0])  # one time for the whole batch in every sampler here
            if not lo <= t0 <= hi:
                return model(x, t, y)
        null = torch.full_like(y, num_classes)
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        v_c, v_u = v.chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    return fn


def _diffusion(t: torch.Tensor, form: str, norm: float) -> torch.Tensor:
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "SBDM":
        return norm * t / (1 - t)
    if form == "sigma":
        return norm * t
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * (1 - t)) + 1) ** 2
    if form == "increasing-decreasing":
        return norm * torch.sin(math.pi * (1 - t)) ** 2
    raise ValueError(f"unknown diffusion form {form!r}; choose one of {DIFFUSION_FORMS}")


@torch.no_grad()
def sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    y: torch.Tensor,
    sampler: str = "euler",
    steps: int = 50,
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    diffusion_form: str = "SBDM",
    diffusion_norm: float = 1.0,
    sde_t_start: float = 0.96,
    sde_last_h: float = 0.04,
) -> torch.Tensor:
    """Integrate from t = 1 (``noise``) to t = 0 and return the samples.

    - ``euler`` / ``heun``: ``steps`` uniform steps (Heun: 2 evaluations per step, 2nd order).
    - ``dopri5``: adaptive Dormand-Prince (torchdiffeq) with ``atol``/``rtol``.
    - ``euler_maruyama``: the official SDE sampler: from ``sde_t_start`` to ``sde_last_h`` with
      drift v - w(t) s(x, t), score s = -((1 - t) v + x) / t and noise sqrt(2 w |dt|), then one
      deterministic step to 0. ``generator`` drives its noise: one generator for the batch, or
      one per sample (CPU generators), so that a sample's noise does not depend on its batch.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    x = noise
    n = x.shape[0]
    if isinstance(generator, (list, tuple)) and len(generator) != n:
        raise ValueError(f"sample: {len(generator)} generators for a batch of {n} samples")

    def v(xx: torch.Tensor, tt: float) -> torch.Tensor:
        return velocity(xx, torch.full((n,), tt, device=xx.device, dtype=torch.float32), y).to(xx.dtype)

    if sampler in ("euler", "heun"):
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t_cur
            d_cur = v(x, t_cur)
            if sampler == "euler":
                x = x + dt * d_cur
            else:
                x_pred = x + dt * d_cur
                x = x + dt * 0.5 * (d_cur + v(x_pred, t_next))
        return x
    if sampler == "dopri5":
        from torchdiffeq import odeint

        def f(tt: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
            return v(xx, float(tt))

        times = torch.tensor([1.0, 0.0], device=x.device, dtype=x.dtype)
        return odeint(f, x, times, method="dopri5", atol=atol, rtol=rtol)[-1]
    # euler_maruyama
    ts = torch.linspace(sde_t_start, sde_last_h, steps, dtype=torch.float64).tolist()

    def drift(xx: torch.Tensor, tt: float) -> tuple[torch.Tensor, torch.Tensor]:
        vel = v(xx, tt)
        score = -((1 - tt) * vel + xx) / tt
        w = _diffusion(torch.tensor(tt, dtype=torch.float64), diffusion_form, diffusion_norm).item()
        return vel - w * score, torch.tensor(w)

    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t_cur
        d, w = drift(x, t_cur)
        if isinstance(generator, (list, tuple)):
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator]).to(x.device, x.dtype)
        else:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + dt * d + eps * math.sqrt(abs(dt) * 2 * float(w))
    d, _ = drift(x, ts[-1])
    return x + (0.0 - ts[-1]) * d
