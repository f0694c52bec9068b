"""Off-policy twist training on a cached corpus of p0 samples (:mod:`twistlm.corpus`).

:class:`CorpusTwistTrainer` is :class:`~twistlm.training.TwistTrainer` with another source of data: instead of
sampling every update, it draws ``num_particles`` rows per prompt uniformly from the corpus (samples of p0, the
negatives of SIXO and FUDGE and the π_t-reweighted negatives of CTL) and, for losses that need them,
``num_positives`` rows per prompt with probability ∝ φ (target positives; MATH.md "Twist losses"). Only the twist
head runs: the base LM's features are read from the corpus, and the head is evaluated at the stored tokens only
(:func:`~twistlm.twists.features.log_psi_at_tokens`), so an update costs a few milliseconds of the base model's
time instead of T forward passes — the reference's budget of thousands of updates × hundreds of samples fits on a CPU.

With q = p0 every proposal ratio is 1: the Rollouts carry log p0 = log q = 0 per step (only their difference enters
the losses). A normalised twist (``twist.normalised``, e.g. the ratio twist) trained with CTL draws no negatives:
its log Z_t ≡ 0 (``TwistLoss.normaliser_from_negatives``). RL is not offered: its bootstrapped target needs
log Σ_v p0(v | s_1:t) ψ_t+1(s_1:t, v) over the whole vocabulary, which the corpus does not store. The corpus is drawn
into ``corpus_dir`` (default ``<output_dir>/corpus``) at the start of training, resumably; resuming a run reuses it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from twistlm.corpus import SampleCorpus, build_corpus, load_corpus
from twistlm.errors import ConfigError
from twistlm.losses import Rollouts
from twistlm.training import TwistTrainer, TwistTrainingConfig
from twistlm.twists.features import log_psi_at_tokens

CORPUS_LOSSES = ("ctl", "sixo", "fudge")
"""Losses whose expectations are over p0 and σ only (RL bootstraps on full-vocabulary values)."""
CORPUS_DIR_NAME = "corpus"


class CorpusTwistTrainer(TwistTrainer):
    """Train ``twist`` for ``target`` on a cached corpus of p0 samples (``config.corpus_samples(T)`` per prompt)."""

    def __init__(self, twist, target, config: TwistTrainingConfig, callbacks=(), run_info=None, accelerator=None,
                 progress=None):
        if config.loss not in CORPUS_LOSSES:
            raise ConfigError(
                f"the {config.loss} loss cannot train on a cached corpus; use one of "
                f"{', '.join(CORPUS_LOSSES)}, or corpus_size=0 and corpus_tokens=0"
            )
        if config.corpus_samples(target.max_new_tokens) < 1:
            raise ConfigError("a corpus trainer needs corpus_size ≥ 1 or corpus_tokens ≥ 1")
        if config.proposal not in (None, "base"):
            raise ConfigError("corpus training draws its negatives from the corpus (p0): leave proposal unset")
        super().__init__(twist, target, config, callbacks=callbacks, run_info=run_info, accelerator=accelerator)
        self.proposal = "base"
        self.corpus: SampleCorpus | None = None
        self.corpus_progress = progress

    @property
    def corpus_path(self) -> Path:
        return Path(self.config.corpus_dir) if self.config.corpus_dir else self.output_dir / CORPUS_DIR_NAME

    def prepare(self) -> None:
        """Draw (or finish, or load) the corpus: each process draws its share of the chunks side by side (chunks are
        seeded by their number, so the corpus is the one a single process would draw; every process writes the same
        ``corpus.json``, atomically), then all read it."""
        acc = self.accelerator
        shard = (acc.process_index, acc.num_processes)
        self.corpus = self._build(shard)
        if shard[1] > 1:
            acc.wait_for_everyone()
            self.corpus = load_corpus(self.corpus_path, self.target, self._samples())

    def _samples(self) -> int:
        return self.config.corpus_samples(self.target.max_new_tokens)

    def _build(self, shard: tuple[int, int]) -> SampleCorpus | None:
        return build_corpus(
            self.target,
            self.corpus_path,
            self._samples(),
            seed=self.config.seed,
            progress=self.corpus_progress,
            shard=shard,
        )

    # -- one update --------------------------------------------------------------------------------------------------

    def _draw(self, n: int, by: str) -> torch.Tensor:
        """(B, n) corpus rows, one row of draws per prompt."""
        return torch.stack([self.corpus.draw(b, n, self.generator, by) for b in range(self.target.num_prompts)])

    def _rollouts(self, rows: torch.Tensor) -> Rollouts:
        c = self.corpus
        B, n = rows.shape
        flat = rows.reshape(-1)
        tokens, lengths = c.tokens[flat], c.lengths[flat]
        lpsi = log_psi_at_tokens(self.twist, c.hidden[flat], tokens, c.prompt_index[flat], lengths)
        T = tokens.shape[1]
        device = lpsi.device
        steps = torch.arange(1, T + 1).unsqueeze(0)
        learned = (steps <= lengths.unsqueeze(1)).to(device)
        finishing = (steps == lengths.unsqueeze(1)).to(device)
        zeros = torch.zeros(B, n, T, dtype=torch.float64, device=device)
        shape = (B, n, T)
        return Rollouts(
            lpsi.to(torch.float64).view(shape),
            learned.view(shape),
            finishing.view(shape),
            zeros,
            zeros,
            zeros,
            c.log_phi[flat].to(device).view(B, n),
            torch.zeros(B, n, dtype=torch.float64, device=device),
        )

    def batch_loss(self) -> tuple[torch.Tensor, list | None]:
        self.twist.train()
        neg = self._rollouts(self._draw(self.config.num_particles, "p0")) if self.needs_negatives else None
        pos = None
        if self.loss.needs_positives:
            pos = self._rollouts(self._draw(self.config.positives_per_prompt, "sigma"))
        return self.loss.compute(neg, pos, self.generator), None


def make_twist_trainer(twist, target, config: TwistTrainingConfig, **kwargs) -> TwistTrainer:
    """The trainer ``config`` asks for: on a cached corpus when it has a corpus size or token budget, otherwise on
    fresh samples."""
    if config.corpus_samples(target.max_new_tokens) > 0:
        return CorpusTwistTrainer(twist, target, config, **kwargs)
    kwargs.pop("progress", None)
    return TwistTrainer(twist, target, config, **kwargs)
