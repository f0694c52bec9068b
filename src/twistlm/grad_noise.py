"""Gradient noise of a twist loss: is one update's gradient signal or noise? (The "simple noise scale" of
McCandlish et al., 2018, *An Empirical Model of Large-Batch Training*.)

A trainer's update draws K samples and takes the gradient g_i of its loss on them; over independent batches i the
g_i scatter around G = E g_i. From n batches:

    signal = ‖G‖²       unbiased U-statistic (‖Σ_i g_i‖² − Σ_i ‖g_i‖²) / (n (n − 1)), jackknife standard error
    noise  = E‖g_i − G‖²  per batch (the unbiased sample variance, summed over parameters)
    snr    = signal / noise
    noise scale = K · noise / signal   samples per update at which the update's noise equals its signal

An update with snr ≪ 1 moves the parameters mostly at random: a run then averages over ≈ 1 / snr updates to move
along G, and checkpoints a few updates apart differ by noise (the spread seen in EXPERIMENTS.md's twist rounds). The
noise scale says how many samples per update would make updates point somewhere; where it is far above what a
machine affords per update, more updates of the same size buy little, and a loss with lower-variance data (exact or
corpus positives) or a larger K is the lever. G itself is what the estimator targets, biases included (e.g. the
self-normalised forward term of the Jeffreys loss at small K).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from twistlm.errors import ConfigError

MIN_BATCHES = 3
"""The jackknife of the U-statistic needs n − 2 ≥ 1."""


@dataclass(frozen=True)
class GradientNoise:
    """Signal and noise of a loss's gradient over ``batches`` independent batches of ``particles`` samples."""

    batches: int
    particles: int
    signal: float
    """‖E g‖², unbiased (can come out negative when the signal is below its own standard error)."""
    signal_se: float
    noise: float
    """E‖g − E g‖² of one batch's gradient."""

    @property
    def snr(self) -> float:
        return self.signal / self.noise if self.noise > 0 else math.inf

    @property
    def noise_scale(self) -> float:
        """Samples per update at which noise and signal are equal (∞ where no signal is measurable)."""
        return self.particles * self.noise / self.signal if self.signal > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "snr": self.snr, "noise_scale": self.noise_scale}


def summarise(grads: torch.Tensor, particles: int) -> GradientNoise:
    """:class:`GradientNoise` of ``grads`` (n, P): row i the flattened gradient of batch i."""
    if grads.dim() != 2 or grads.shape[0] < MIN_BATCHES:
        raise ConfigError(f"need a (batches, parameters) tensor with at least {MIN_BATCHES} batches, got "
                          f"{tuple(grads.shape)}")
    g = grads.double()
    n = g.shape[0]
    total = g.sum(dim=0)
    sq = g.pow(2).sum(dim=1)
    cross = g @ total  # g_i · Σ_j g_j
    total_sq = total.pow(2).sum()
    signal = (total_sq - sq.sum()) / (n * (n - 1))
    # leave-one-out: ‖Σ_{j≠i} g_j‖² = ‖Σ‖² − 2 g_i·Σ + ‖g_i‖²
    loo = ((total_sq - 2 * cross + sq) - (sq.sum() - sq)) / ((n - 1) * (n - 2))
    se = math.sqrt(float((n - 1) / n * (loo - loo.mean()).pow(2).sum()))
    noise = float((sq.sum() - total_sq / n) / (n - 1))  # Σ‖g_i − ḡ‖² / (n − 1), without an (n, P) temporary
    return GradientNoise(n, particles, float(signal), se, noise)


def gradient_noise(trainer: Any, batches: int) -> GradientNoise:
    """Measure a twist trainer's gradient noise at its twist's current parameters: ``batches`` calls of
    ``trainer.batch_loss()`` (each draws its own samples, as an update would; the trainer's generator advances, the
    parameters do not change). ``trainer``: a :class:`~twistlm.training.TwistTrainer` or its corpus variant, in one
    process (gradients are not averaged over processes here)."""
    if batches < MIN_BATCHES:
        raise ConfigError(f"batches must be at least {MIN_BATCHES}, got {batches}")
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the trainer's twist has no trainable parameters")
    rows = []
    for _ in range(batches):
        loss, _ = trainer.batch_loss()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double().cpu()
                               for g, p in zip(grads, params)]))
    return summarise(torch.stack(rows), trainer.config.num_particles)
