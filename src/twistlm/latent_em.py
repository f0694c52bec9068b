"""Classification through a latent rationale, trained by Monte Carlo EM (the GFlowNet paper's SUBJ setting).

Model of a label y given an input x, with a rationale z the base model writes after the prompt:

    p_θ(y, z | x) = p0(z | x) · p_θ(y | x, z),

p_θ(y | x, z) the verbalized-label classifier of :mod:`twistlm.classify` (a LoRA adapter on the base model). EM on
the labelled pairs (x, y):

* **E-step** — the posterior over rationales σ(z | x, y) ∝ p0(z | x) p_θ(y | x, z), by sampling–importance–
  resampling: K rationales z_k ~ p0(z | x), weights w_k = p_θ(y | x, z_k), ``kept`` of them resampled ∝ w_k
  (seeded). (An amortized sampler of σ — a GFlowNet policy — would replace SIR here; the M-step is the same.)
* **M-step** — LoRA SFT of p_θ(y | x, z) on the resampled (x, z, y) (cross-entropy over the labels).

The first E-step weighs by the base model's own judgment p0(y | x, z) normalised over labels (θ at initialisation:
the adapter starts at zero). Prediction marginalises the rationale, p_θ(y | x) ≈ (1/M) Σ_m p_θ(y | x, z_m) with
z_m ~ p0(z | x) (the label is unknown at test time), rationales always drawn from the base model (adapter off).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from twistlm.classify import Classifier, LabelFormat, Labelled, SFTSettings, train_classifier
from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.smc import run_smc
from twistlm.target import Target

SAMPLING_CHUNK = 64
"""Inputs whose rationales are drawn side by side (K rows each)."""


@dataclass
class EMSettings:
    rounds: int = 1
    """E-step / M-step iterations (each M-step continues the same adapter)."""
    rationales: int = 8
    """K rationales drawn from p0(z | x) per labelled example in each E-step."""
    kept: int = 2
    """Rationales resampled per labelled example ∝ p_θ(y | x, z) for the M-step."""
    predict_rationales: int = 4
    """M rationales per input when predicting."""
    sft: SFTSettings = field(default_factory=SFTSettings)


def _base(lm: ParticleLM):
    """Context in which ``lm`` computes p0 (adapter off), whether or not an adapter is attached."""
    import contextlib

    from twistlm.gfn.policy import base_model_of

    return base_model_of(lm) if getattr(lm, "peft_model", None) is not None else contextlib.nullcontext()


def sample_rationales(lm: ParticleLM, fmt: LabelFormat, texts: Sequence[str], k: int, generator: torch.Generator
                      ) -> list[list[str]]:
    """k rationales z ~ p0(z | x) per text (SIS without weights: φ ≡ 1), written after the format's prompt."""
    out: list[list[str]] = []
    with _base(lm):
        for c in range(0, len(texts), SAMPLING_CHUNK):
            chunk = texts[c : c + SAMPLING_CHUNK]
            target = Target(lm, prompts=[fmt.prompt(t) for t in chunk], max_new_tokens=fmt.max_rationale_tokens,
                            stop_token_ids=fmt.rationale_stop_ids(lm))
            results = run_smc(target, k, proposal="base", ess_threshold=0.0, generator=generator)
            out.extend(list(r.texts) for r in results)
    return out


class RationaleClassifier(Classifier):
    """p_θ(y | x) = mean over M rationales z ~ p0(z | x) of p_θ(y | x, z) (module docstring)."""

    def __init__(self, lm: ParticleLM, fmt: LabelFormat, rationales: int, generator: torch.Generator):
        super().__init__(lm, fmt)
        self.rationales, self.generator = rationales, generator
        self.last_rationales: list[list[str]] = []

    def log_probs(self, texts, rationales=None, batch_size: int = 16) -> torch.Tensor:
        if rationales is not None:
            return super().log_probs(texts, rationales, batch_size)
        zs = sample_rationales(self.lm, self.fmt, list(texts), self.rationales, self.generator)
        self.last_rationales = zs
        lp = per_rationale_log_probs(self, texts, zs, batch_size)
        return torch.logsumexp(lp, dim=1) - math.log(self.rationales)


def per_rationale_log_probs(clf: Classifier, texts: Sequence[str], zs: Sequence[Sequence[str]],
                            batch_size: int = 16) -> torch.Tensor:
    """(N, K, L) log p_θ(l | x_i, z_ik) for the K rationales z_i1 … z_iK of each text."""
    flat_x = [t for t, z in zip(texts, zs) for _ in z]
    flat_z = [r for z in zs for r in z]
    return clf.log_probs(flat_x, flat_z, batch_size).view(len(texts), len(zs[0]), -1)


def e_step(clf: Classifier, labelled: Sequence[Labelled], settings: EMSettings, generator: torch.Generator
           ) -> tuple[list[Labelled], float]:
    """``kept`` rationales per labelled example resampled ∝ p_θ(y | x, z) from ``rationales`` draws of p0(z | x);
    also the mean ESS fraction of the weights (how informative the rationales are about the label)."""
    texts = [e.text for e in labelled]
    zs = sample_rationales(clf.lm, clf.fmt, texts, settings.rationales, generator)
    lp = per_rationale_log_probs(clf, texts, zs)
    out, ess = [], 0.0
    for i, e in enumerate(labelled):
        logw = lp[i, :, e.label]
        w = torch.softmax(logw, 0)
        ess += float(1.0 / (w * w).sum()) / settings.rationales
        picks = torch.multinomial(w, settings.kept, replacement=True, generator=generator).tolist()
        out.extend(Labelled(e.text, e.label, zs[i][j]) for j in picks)
    return out, ess / len(labelled)


def fit_latent_em(lm: ParticleLM, fmt: LabelFormat, labelled: Sequence[Labelled], generator: torch.Generator,
                  settings: EMSettings | None = None, on_round: Callable[[int, dict], None] | None = None
                  ) -> RationaleClassifier:
    """EM (module docstring) on ``labelled``; attaches a LoRA adapter to ``lm`` in place."""
    s = settings or EMSettings()
    if not labelled:
        raise ConfigError("latent-em needs at least one labelled example")
    for name in ("rounds", "rationales", "kept", "predict_rationales"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(s, name)}")
    lm = s.sft.attach(lm)
    clf = RationaleClassifier(lm, fmt, s.predict_rationales, generator)
    losses: list[float] = []
    for r in range(s.rounds):
        data, ess = e_step(clf, labelled, s, generator)
        train_classifier(lm, fmt, data, generator, s.sft, on_epoch=lambda e, loss: losses.append(loss))
        if on_round is not None:
            on_round(r + 1, {"ess_fraction": ess, "loss": losses[-1], "examples": data})
    return clf
