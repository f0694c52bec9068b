"""Classification through a latent rationale, trained by Monte Carlo EM (the GFlowNet paper's SUBJ setting).

Model of a label y given an input x, with a rationale z the base model writes after the prompt:

    p_θ(y, z | x) = p0(z | x) · p_θ(y | x, z),

p_θ(y | x, z) the verbalized-label classifier of :mod:`twistlm.classify` (a LoRA adapter on the base model). EM on
the labelled pairs (x, y):

* **E-step** — the posterior over rationales σ(z | x, y) ∝ p0(z | x) p_θ(y | x, z), by sampling–importance–
  resampling: K rationales z_k ~ r(z | x, y), weights w_k = p0(z_k | x) p_θ(y | x, z_k) / r(z_k | x, y), ``kept``
  of them resampled ∝ w_k (seeded). The proposal r is p0(z | x) itself (w_k = p_θ(y | x, z_k)), or an amortized
  sampler, :class:`PolicyRationales`: a GFlowNet policy q(z | x) trained on R(z ⊤) = p0(z "." y | x) over the
  labelled sentences (``twistlm train-gfn --task subjectivity``). Any proposal gives the same E-step target; a
  better one gives weights with a larger ESS.
* **M-step** — LoRA SFT of p_θ(y | x, z) on the resampled (x, z, y) (cross-entropy over the labels).

The first E-step weighs by the base model's own judgment p0(y | x, z) normalised over labels (θ at initialisation:
the adapter starts at zero). Prediction averages over M rationales, p_θ(y | x) ≈ (1/M) Σ_m p_θ(y | x, z_m), drawn
from the same proposal (the label is unknown at test time): from p0(z | x) (adapter off) this is the model's own
marginal; from the policy q(z | x) it is the GFlowNet paper's rule — the amortized sampler, which never sees y,
writes rationales for the label it infers from x, and the classifier reads them.
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


def draw_from(lm: ParticleLM, fmt: LabelFormat, texts: Sequence[str], k: int, generator: torch.Generator,
              policy: ParticleLM | None = None, space=None, labels: Sequence[int] | None = None
              ) -> tuple[list[list[str]], torch.Tensor]:
    """k rationales per text, written after the format's prompt, from p0(z | x) (``policy`` None) or from a policy
    q (SIS, φ ≡ 1), and their (N, k) float64 log importance ratios log p0(z | x) − log q(z | ·) (zeros for p0).
    ``labels`` become the observations an observation-reading policy needs. Horizon: the format's, or one past the
    policy space's ``max_len`` actions when shorter (room for the stop it was trained to write there)."""
    from twistlm.potentials.likelihood import OBSERVATION_KEY

    horizon = fmt.max_rationale_tokens if space is None else min(fmt.max_rationale_tokens, space.max_len + 1)
    zs, ratios = [], []
    with _base(lm):
        for c in range(0, len(texts), SAMPLING_CHUNK):
            chunk = list(texts[c : c + SAMPLING_CHUNK])
            extras = {} if labels is None else {
                OBSERVATION_KEY: [fmt.verbalizer(y) for y in labels[c : c + SAMPLING_CHUNK]]}
            target = Target(lm, prompts=[fmt.prompt(t) for t in chunk], max_new_tokens=horizon,
                            stop_token_ids=fmt.rationale_stop_ids(lm), extras=extras)
            results = run_smc(target, k, proposal="base" if policy is None else "policy", policy=policy,
                              policy_space=space, ess_threshold=0.0, generator=generator)
            zs.extend(list(r.texts) for r in results)
            ratios.extend(r.log_weights.double() for r in results)
    return zs, torch.stack(ratios)


def sample_rationales(lm: ParticleLM, fmt: LabelFormat, texts: Sequence[str], k: int, generator: torch.Generator
                      ) -> list[list[str]]:
    """k rationales z ~ p0(z | x) per text (:func:`draw_from` without a policy)."""
    return draw_from(lm, fmt, texts, k, generator)[0]


class PolicyRationales:
    """Rationales from a trained policy q (a :func:`twistlm.gfn.load_policy` LM on its own copy of the base model)
    with their exact log importance ratio log p0(z | x) − log q(z | ·) — SIS with the policy as the proposal
    (:mod:`twistlm.policy_proposal`), φ ≡ 1. A policy that reads the observation (condition ``observation``) is
    given the label's verbalization, so it can propose in the E-step but not at prediction time.

    ``space``: the action space the policy was trained in (:func:`twistlm.gfn.policy.load_action_space`); the
    ratio is exact for that restricted q (rationales q cannot write, e.g. ending on "!" for a "."-stop policy, are
    never proposed: the E-step then targets σ restricted to q's support)."""

    def __init__(self, policy: ParticleLM, space=None):
        self.policy, self.space = policy, space

    def draw(self, lm: ParticleLM, fmt: LabelFormat, texts: Sequence[str], k: int, generator: torch.Generator,
             labels: Sequence[int] | None = None) -> tuple[list[list[str]], torch.Tensor]:
        """k rationales per text and their (N, k) log p0(z | x) − log q(z | ·) (:func:`draw_from`)."""
        return draw_from(lm, fmt, texts, k, generator, self.policy, self.space, labels)


class RationaleClassifier(Classifier):
    """p_θ(y | x) = mean over M rationales z of p_θ(y | x, z), z ~ p0(z | x) or ~ ``sampler``'s q(z | x) (module
    docstring)."""

    def __init__(self, lm: ParticleLM, fmt: LabelFormat, rationales: int, generator: torch.Generator,
                 sampler: PolicyRationales | None = None):
        super().__init__(lm, fmt)
        self.rationales, self.generator, self.sampler = rationales, generator, sampler
        self.last_rationales: list[list[str]] = []
        self.rounds: list[dict] = []  # per EM round: the E-step's mean ESS fraction, the M-step's last loss

    def log_probs(self, texts, rationales=None, batch_size: int = 16) -> torch.Tensor:
        if rationales is not None:
            return super().log_probs(texts, rationales, batch_size)
        draw = self.sampler.draw if self.sampler is not None else draw_from
        zs, _ = draw(self.lm, self.fmt, list(texts), self.rationales, self.generator)
        self.last_rationales = zs
        lp = per_rationale_log_probs(self, texts, zs, batch_size)
        return torch.logsumexp(lp, dim=1) - math.log(self.rationales)


def per_rationale_log_probs(clf: Classifier, texts: Sequence[str], zs: Sequence[Sequence[str]],
                            batch_size: int = 16) -> torch.Tensor:
    """(N, K, L) log p_θ(l | x_i, z_ik) for the K rationales z_i1 … z_iK of each text."""
    flat_x = [t for t, z in zip(texts, zs) for _ in z]
    flat_z = [r for z in zs for r in z]
    return clf.log_probs(flat_x, flat_z, batch_size).view(len(texts), len(zs[0]), -1)


def e_step(clf: Classifier, labelled: Sequence[Labelled], settings: EMSettings, generator: torch.Generator,
           sampler: PolicyRationales | None = None) -> tuple[list[Labelled], float]:
    """``kept`` rationales per labelled example resampled ∝ p0(z | x) p_θ(y | x, z) / r(z | x, y) from
    ``rationales`` draws of r (``sampler``, default p0: weights p_θ(y | x, z)); also the mean ESS fraction of the
    weights (how informative the rationales are about the label, or how close r is to the posterior)."""
    texts = [e.text for e in labelled]
    draw = sampler.draw if sampler is not None else draw_from
    zs, log_ratio = draw(clf.lm, clf.fmt, texts, settings.rationales, generator, labels=[e.label for e in labelled])
    lp = per_rationale_log_probs(clf, texts, zs)
    out, ess = [], 0.0
    for i, e in enumerate(labelled):
        logw = log_ratio[i] + lp[i, :, e.label]
        w = torch.softmax(logw, 0)
        ess += float(1.0 / (w * w).sum()) / settings.rationales
        picks = torch.multinomial(w, settings.kept, replacement=True, generator=generator).tolist()
        out.extend(Labelled(e.text, e.label, zs[i][j]) for j in picks)
    return out, ess / len(labelled)


def fit_latent_em(lm: ParticleLM, fmt: LabelFormat, labelled: Sequence[Labelled], generator: torch.Generator,
                  settings: EMSettings | None = None, on_round: Callable[[int, dict], None] | None = None,
                  sampler: PolicyRationales | None = None) -> RationaleClassifier:
    """EM (module docstring) on ``labelled``, rationales (E-step and prediction) from ``sampler`` (default p0);
    attaches a LoRA adapter to ``lm`` in place."""
    s = settings or EMSettings()
    if not labelled:
        raise ConfigError("latent-em needs at least one labelled example")
    for name in ("rounds", "rationales", "kept", "predict_rationales"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(s, name)}")
    lm = s.sft.attach(lm, generator)
    clf = RationaleClassifier(lm, fmt, s.predict_rationales, generator, sampler)
    losses: list[float] = []
    for r in range(s.rounds):
        data, ess = e_step(clf, labelled, s, generator, sampler)
        train_classifier(lm, fmt, data, generator, s.sft, on_epoch=lambda e, loss: losses.append(loss))
        clf.rounds.append({"round": r + 1, "ess_fraction": ess, "loss": losses[-1]})
        if on_round is not None:
            on_round(r + 1, {"ess_fraction": ess, "loss": losses[-1], "examples": data})
    return clf
