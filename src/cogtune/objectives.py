"""Training objectives, apart from any model: a family picks one (ModelFacts.objective) and feeds it its latents.

Both draw every random number of sample i from gens[i] (on the CPU), so a sample's loss does not depend on the rank
or micro-batch it lands in. `timestep_sampling` (config `loss.`): uniform, or logit-normal u = sigmoid(N(mean, std));
either is then shifted, u' = shift·u / (1 + (shift−1)·u) (shift > 1 favours noisier points).

v-prediction (DDPM, CogVideoX): t ~ U{0..T-1} (or round(u'·(T−1))); x_t = add_noise(x0, ε, t); the output is read as
v; x̂0 = get_velocity(out, x_t, t) = sqrt(ᾱ)·x_t − sqrt(1−ᾱ)·out; loss = mean(w·(x̂0 − x0)²) with w = 1/(1−ᾱ_t)
("default", as every CogVideoX trainer defines it). Since x̂0 − x0 = −sqrt(1−ᾱ)·(out − v), that is exactly the plain
MSE on v; "none" drops w and so down-weights low-noise timesteps by (1−ᾱ_t).

Flow matching (rectified flow: Wan, Hunyuan, LTX): σ = u'; x_σ = (1−σ)·x0 + σ·ε; the model sees timestep σ·T and
predicts the velocity dx/dσ = ε − x0; loss = mean((out − (ε − x0))²) ("default" and "none" are the same here).
"""

from __future__ import annotations

import torch


def randn(gens: list[torch.Generator], shape) -> torch.Tensor:
    """Standard normal noise of `shape` (batch first), sample i drawn from gens[i] (on the CPU, so any device agrees)."""
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in gens])


def _shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def _per_sample_mean(err: torch.Tensor) -> torch.Tensor:
    return err.reshape(err.shape[0], -1).mean(dim=1).mean()


class VPrediction:
    """DDPM with v-prediction over a diffusers scheduler's ᾱ table."""

    name = "v_prediction"
    heldout = (100, 300, 500, 700, 900)  # fixed timesteps of the held-out loss

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.steps = scheduler.config.num_train_timesteps

    def heldout_points(self) -> list[tuple[int, torch.Tensor]]:
        """(seed key, timestep) pairs of the held-out loss."""
        return [(t, torch.tensor([t])) for t in self.heldout]

    def sample(self, gens: list[torch.Generator], loss_cfg=None) -> torch.Tensor:
        if loss_cfg is None or loss_cfg.timestep_sampling == "uniform":
            return torch.cat([torch.randint(0, self.steps, (1,), generator=g) for g in gens])
        u = torch.sigmoid(loss_cfg.logit_mean + loss_cfg.logit_std * randn(gens, (len(gens),)))
        return (_shifted(u, loss_cfg.timestep_shift) * (self.steps - 1)).round().long()

    def prepare(self, t: torch.Tensor, device) -> torch.Tensor:
        return t.to(device).long()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The output a perfect model gives: v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0."""
        return self.scheduler.get_velocity(x0, noise, t)

    def loss(self, pred, x0, noise, noisy, t, weighting: str = "default") -> torch.Tensor:
        """Per-batch mean of w·(x̂0 − x0)² with x̂0 = get_velocity(pred, x_t, t) (see the module docstring)."""
        x0_hat = self.scheduler.get_velocity(pred, noisy, t)
        err = (x0_hat - x0) ** 2
        if weighting in ("default", "official"):
            alpha_bar = self.scheduler.alphas_cumprod.to(x0.device)[t].to(err.dtype)
            err = err / (1 - alpha_bar).view(-1, *[1] * (err.dim() - 1))
        return _per_sample_mean(err)


class FlowMatching:
    """Rectified flow: straight paths from data (σ = 0) to noise (σ = 1), velocity targets."""

    name = "flow_matching"
    heldout = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed σ of the held-out loss

    def __init__(self, num_train_timesteps: int = 1000):
        self.steps = num_train_timesteps

    def heldout_points(self) -> list[tuple[int, torch.Tensor]]:
        return [(round(s * self.steps), torch.tensor([s])) for s in self.heldout]

    def sample(self, gens: list[torch.Generator], loss_cfg=None) -> torch.Tensor:
        if loss_cfg is None or loss_cfg.timestep_sampling == "uniform":
            u = torch.cat([torch.rand(1, generator=g) for g in gens])
        else:
            u = torch.sigmoid(loss_cfg.logit_mean + loss_cfg.logit_std * randn(gens, (len(gens),)))
        return _shifted(u, loss_cfg.timestep_shift if loss_cfg is not None else 1.0)

    def prepare(self, sigma: torch.Tensor, device) -> torch.Tensor:
        return sigma.to(device, torch.float32)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
        return (1 - s) * x0 + s * noise

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.steps

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The velocity dx/dσ = ε − x0 of the straight path."""
        return noise - x0

    def loss(self, pred, x0, noise, noisy, sigma, weighting: str = "default") -> torch.Tensor:
        return _per_sample_mean((pred - self.target(x0, noise, sigma)) ** 2)


def make_objective(name: str, scheduler=None, num_train_timesteps: int = 1000):
    if name == VPrediction.name:
        return VPrediction(scheduler)
    if name == FlowMatching.name:
        return FlowMatching(num_train_timesteps)
    raise ValueError(f"unknown objective {name!r}")
