"""Training twists: :class:`TwistTrainingConfig` (an ``HfArgumentParser`` dataclass) and :class:`TwistTrainer`.

Each update (MATH.md, "Twist losses"):

1. draw K negatives per prompt from the proposal — p0 (``proposal="base"``) or the current twist-induced proposal
   (``"twisted"``) — by importance sampling (no resampling: i.i.d. draws from q);
2. if the loss needs them, draw positives from a source of :mod:`twistlm.positives`: ``exact`` (enumeration, toy
   problems), ``rejection`` (p0 draws accepted with probability φ), ``smc`` (twisted SMC particles with their
   normalised weights, MATH.md's "approximate positives") or ``buffer`` (replay of every φ > 0 sequence seen, ∝ p0 φ);
3. compute the frozen base LM's features of every prefix once (:func:`~twistlm.twists.features.prefix_features`),
   apply the twist to them *with* grad, and take one optimizer step on the registered loss (:mod:`twistlm.losses`).

The loop itself — callbacks, schedule, accelerate, logging, atomic checkpoints, exact resume, the guards on the output
folder — is :class:`twistlm.trainloop.TrainLoop`, shared with the GFlowNet trainer. Why not a ``transformers.Trainer``
subclass: every batch is generated on-policy by a sampler that calls the twist under ``inference_mode``, the "model"
is a head evaluated on another model's features, and exact resumption needs the sampler's ``torch.Generator`` state in
the checkpoint; overriding ``get_train_dataloader``, ``compute_loss``, ``training_step`` and ``_save_checkpoint``
would leave little of ``Trainer`` but its surprises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twistlm.errors import ConfigError
from twistlm.losses import Rollouts, TwistLoss, get_loss, make_rollouts
from twistlm.positives import (
    BOUNDED_ONLY,
    POSITIVE_SOURCES,
    PositiveRequest,
    Samples,
    get_positive_source,
    samples_from_results,
)
from twistlm.prompt_data import PromptBatches
from twistlm.smc import run_smc
from twistlm.target import Target
from twistlm.trainloop import (
    CURVE_NAME,
    EXAMPLES_PER_SNAPSHOT,
    LoopConfig,
    TrainLoop,
    list_checkpoints,
    make_accelerator,
)
from twistlm.twists.base import Twist
from twistlm.twists.features import prefix_features, prefix_log_psi
from twistlm.twists.io import load_twist_state, read_config, read_weights, save_twist

PROPOSALS = ("base", "twisted")
POSITIVES_KEY = "positives"

__all__ = ["CURVE_NAME", "POSITIVE_SOURCES", "TwistTrainer", "TwistTrainingConfig", "list_checkpoints"]


@dataclass
class TwistTrainingConfig(LoopConfig):
    """Settings of a twist training run; parse with ``HfArgumentParser(TwistTrainingConfig)``. The loop's own fields
    (learning rate, steps, schedule, checkpoints, resume/overwrite) are those of :class:`~twistlm.trainloop.LoopConfig`."""

    output_dir: str = field(default="twist-out", metadata={"help": "Where checkpoints and the final twist go."})
    loss: str = field(default="ctl", metadata={"help": "Twist loss: ctl | rl | sixo | fudge | jeffreys."})
    num_particles: int = field(default=32, metadata={"help": "Negatives (proposal samples) per prompt per update."})
    num_positives: int | None = field(default=None, metadata={"help": "Positives per prompt (default: num_particles)."})
    proposal: str | None = field(
        default=None, metadata={"help": "Proposal of the negatives: base | twisted (default: the loss's choice)."}
    )
    positives: str = field(default="smc", metadata={"help": "Positives: exact | observed | smc | rejection | buffer."})
    buffer_size: int = field(default=0, metadata={"help": "Replay buffer capacity per prompt (0: the default)."})
    positive_ess_threshold: float = field(default=0.5, metadata={"help": "κ of the SMC that draws positives."})
    rejection_particles: int | None = field(
        default=None, metadata={"help": "p0 draws per prompt for rejection positives (default: 4 × num_positives)."}
    )
    corpus_size: int = field(
        default=0,
        metadata={"help": "p0 samples per prompt drawn once and reused by every update (off-policy training on a "
                  "cached corpus, twistlm.corpus); 0: draw fresh samples every update."},
    )
    corpus_tokens: int = field(
        default=0,
        metadata={"help": "The corpus as a budget of generated tokens per prompt: corpus_size = ⌈corpus_tokens / T⌉ "
                  "(used when corpus_size is 0), so one setting fits tasks with different horizons."},
    )
    corpus_dir: str | None = field(
        default=None, metadata={"help": "Folder of the cached corpus (default: <output_dir>/corpus); shareable."}
    )
    eval_particles: int | None = field(
        default=None, metadata={"help": "Particles of the twisted SIS run logged as log Ẑ (default: num_particles)."}
    )
    prompts_per_step: int = field(
        default=0,
        metadata={"help": "Questions drawn per update from the target's prompts, a dataset of prompts "
                  "(twistlm.prompt_data); 0: every update uses all of them."},
    )
    init_twist: str | None = field(
        default=None,
        metadata={"help": "Start from the weights of a saved twist of the same kind (a folder with twist.safetensors), "
                  "e.g. a corpus-trained twist continued on-policy; a resumed run's checkpoint wins over it."},
    )

    resume_keys = LoopConfig.resume_keys + (
        "loss",
        "num_particles",
        "num_positives",
        "proposal",
        "positives",
        "positive_ess_threshold",
        "rejection_particles",
        "buffer_size",
        "corpus_size",
        "corpus_tokens",
        "prompts_per_step",
        "init_twist",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        get_loss(self.loss)
        if self.proposal is not None and self.proposal not in PROPOSALS:
            raise ConfigError(f"unknown proposal {self.proposal!r}; choose from: {', '.join(PROPOSALS)}")
        if self.positives not in POSITIVE_SOURCES:
            raise ConfigError(
                f"unknown positives source {self.positives!r}; choose from: {', '.join(POSITIVE_SOURCES)}"
            )
        if self.num_particles < 1:
            raise ConfigError(f"num_particles must be ≥ 1, got {self.num_particles}")
        if self.buffer_size < 0:
            raise ConfigError(f"buffer_size must be ≥ 0, got {self.buffer_size}")
        if self.prompts_per_step < 0:
            raise ConfigError(f"prompts_per_step must be ≥ 0, got {self.prompts_per_step}")
        for name in ("corpus_size", "corpus_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("num_positives", "rejection_particles", "eval_particles"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {value}")
        if not 0.0 <= self.positive_ess_threshold <= 1.0:
            raise ConfigError(f"positive_ess_threshold must lie in [0, 1], got {self.positive_ess_threshold}")

    def corpus_samples(self, max_new_tokens: int) -> int:
        """Samples per prompt of the cached corpus (0: on-policy training)."""
        return self.corpus_size or -(-self.corpus_tokens // max_new_tokens)

    @property
    def loss_spec(self) -> TwistLoss:
        return get_loss(self.loss)

    @property
    def negative_proposal(self) -> str:
        return self.proposal or self.loss_spec.default_proposal

    @property
    def positives_per_prompt(self) -> int:
        return self.num_positives or self.num_particles


def load_initial_twist(twist: Twist, directory: str | Path) -> None:
    """Load a saved twist's weights into ``twist`` (``init_twist``): the same kind, every tensor in its place."""
    kind = getattr(twist, "kind", None)
    saved = read_config(directory).get("kind")
    if kind is not None and saved != kind:
        raise ConfigError(f"init_twist {directory} is a {saved!r} twist, not {kind!r}")
    load_twist_state(twist, read_weights(directory))


def _metrics(results, num_particles: int) -> dict[str, float]:
    """log Ẑ, ESS / K and mean φ of an importance-sampling run (means over prompts)."""
    log_z = float(np.mean([r.log_z for r in results]))
    ess = float(np.mean([r.ess[-1] / num_particles if r.ess else 0.0 for r in results]))
    reward = float(torch.cat([r.log_phi for r in results]).exp().mean())
    return {"log_z": log_z, "ess": ess, "mean_reward": reward}


class TwistTrainer(TrainLoop):
    """Train ``twist`` for ``target`` with ``config`` (see the module docstring).

    callbacks: ``transformers.TrainerCallback`` instances (or any objects with some of their ``on_*`` methods).
    run_info: extra fields for ``training_config.json`` (task, model, twist kind, ...); its task, task options,
    horizon and model name must match the checkpoint's on resume.
    """

    curve_panels = (("loss", "loss"), ("log_z", "log Ẑ (twisted SIS)"), ("ess", "ESS / K"), ("mean_reward", "mean φ"))

    def __init__(
        self,
        twist: Twist,
        target: Target,
        config: TwistTrainingConfig,
        callbacks: Sequence[Any] = (),
        run_info: dict | None = None,
        accelerator: Any = None,
    ):
        self.twist, self.target = twist, target
        self.model = twist
        self.loss = config.loss_spec
        self.proposal = config.negative_proposal
        bounded = bool(getattr(target.potential, "bounded", False))
        if self.loss.bounded_only and not bounded:
            raise ConfigError(
                f"the {self.loss.name} loss needs a potential with 0 ≤ φ ≤ 1, but {target.potential.name!r} is not "
                "declared bounded (use ctl, rl or sixo, or a potential with bounded=True)"
            )
        output = getattr(twist, "output", "log")
        if output != self.loss.twist_output:
            raise ConfigError(
                f"the {self.loss.name} loss needs a twist with output={self.loss.twist_output!r}, this one has "
                f"{output!r} (build it with output={self.loss.twist_output!r})"
            )
        if self.loss.needs_log_q and self.proposal != "twisted":
            raise ConfigError(
                f"the {self.loss.name} loss learns from the twisted proposal's own samples: leave proposal unset "
                f"(or 'twisted'), not {self.proposal!r}"
            )
        if self.loss.needs_positives and config.positives in BOUNDED_ONLY and not bounded:
            raise ConfigError(
                f"{config.positives} positives need a potential with 0 ≤ φ ≤ 1 (use positives='smc' or 'buffer')"
            )
        self.positive_source = get_positive_source(
            config.positives if self.loss.needs_positives else "smc", target, config.buffer_size
        )
        if accelerator is None:
            accelerator = make_accelerator(cpu=target.lm.device.type == "cpu")
        if config.init_twist:
            load_initial_twist(twist, config.init_twist)
        twist.to(accelerator.device)
        self.prompt_batches = PromptBatches.for_config(target, config, twist)  # None: the fixed target
        bind = getattr(twist, "bind_target", None)
        if callable(bind):
            bind(target)
        super().__init__(
            config, list(twist.parameters()), callbacks=callbacks, run_info=run_info, accelerator=accelerator
        )

    # -- one update --------------------------------------------------------------------------------------------------

    def _negatives(self) -> tuple[Samples, list]:
        twist = self.twist if self.proposal == "twisted" else None
        results = run_smc(
            self.target,
            self.config.num_particles,
            proposal=self.proposal,
            twist=twist,
            ess_threshold=0.0,
            generator=self.generator,
        )
        return samples_from_results(results), results

    def _positives(self) -> Samples | None:
        if not self.loss.needs_positives:
            return None
        cfg = self.config
        request = PositiveRequest(
            self.target,
            self.twist,
            cfg.positives_per_prompt,
            self.generator,
            cfg.positive_ess_threshold,
            cfg.rejection_particles,
        )
        return self.positive_source.draw(request)

    def _rollouts(self, samples: Samples, feats, proposal: str, differentiable_q: bool = False) -> Rollouts:
        log_psi_all = prefix_log_psi(self.twist, feats)
        B = self.target.num_prompts
        return make_rollouts(feats, log_psi_all, samples.log_phi, B, log_weight=samples.log_weight, proposal=proposal,
                             differentiable_q=differentiable_q)

    def _features(self, samples: Samples):
        """Frozen base-LM features of every prefix of ``samples`` (B groups of equal size, row b·n + j)."""
        target = self.target
        n = len(samples.sequences) // target.num_prompts
        index = [i // n for i in range(len(samples.sequences))]
        return prefix_features(
            target.lm, target.prompt_ids, samples.sequences, prompt_index=index, max_new_tokens=target.max_new_tokens
        )

    @property
    def needs_negatives(self) -> bool:
        """False for a loss whose negatives only estimate ∇ log Z_t with a normalised twist (Z_t ≡ 1: CTL with the
        ratio twist), which then trains on positives alone — unless the positives come from the negatives (buffer)."""
        known = self.loss.normaliser_from_negatives and getattr(self.twist, "normalised", False)
        return not known or self.positive_source.fed_by_negatives

    def compute_loss(self, negatives: Samples | None, positives: Samples | None) -> torch.Tensor:
        """The configured loss on stored samples (base-LM features without grad; the twist with grad)."""
        neg = None
        if negatives is not None:
            neg = self._rollouts(negatives, self._features(negatives), self.proposal, self.loss.needs_log_q)
        pos = None
        if positives is not None:
            # The positives' proposal does not enter any loss (only their data weights do).
            pos = self._rollouts(positives, self._features(positives), "base")
        return self.loss.compute(neg, pos, self.generator)

    def update_target(self) -> None:
        """Hook at the start of every update: set ``self.target``, the prompts this update trains on. Default: the
        fixed target; with ``prompts_per_step`` = P > 0, P questions drawn from the target's prompts with the
        trainer's generator (:class:`twistlm.prompt_data.PromptBatches`), the twist rebound to them."""
        if self.prompt_batches is None:
            return
        self.target = self.prompt_batches.draw(self.generator)
        bind = getattr(self.twist, "bind_target", None)
        if callable(bind):
            bind(self.target)

    def training_step(self) -> tuple[float, list | None]:
        """Sample, compute the loss, take one optimizer step; returns the loss and the negatives' results."""
        loss, results = self.batch_loss()
        return self.optimizer_step(loss, {self.loss.name: loss}), results

    def batch_loss(self) -> tuple[torch.Tensor, list | None]:
        """One update's loss (with grad, no step) on freshly drawn samples, and the negatives' results. Advances the
        trainer's generator like an update; :func:`twistlm.grad_noise.gradient_noise` calls it repeatedly."""
        self.twist.train()
        self.update_target()
        negatives, results = None, None
        if self.needs_negatives:
            negatives, results = self._negatives()
            if self.loss.needs_positives:  # SIS negatives: log_weights = log σ̃(s) − log q(s) exactly
                self.positive_source.observe(negatives, torch.stack([r.log_weights.double() for r in results]))
        positives = self._positives()
        return self.compute_loss(negatives, positives), results

    def eval_metrics(self, results: list) -> dict[str, float]:
        """log Ẑ, ESS and mean φ of the twisted proposal (reuses the negatives when they came from it).

        Otherwise runs an extra importance-sampling pass with a generator of its own, seeded by (seed, step), so
        logging never changes the training trajectory.
        """
        own_run = self.proposal != "twisted" or not results  # no twisted negatives this step (or none at all)
        if own_run:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.state.global_step)
            results = run_smc(
                self.target,
                self.eval_particles,
                proposal="twisted",
                twist=self.twist,
                ess_threshold=0.0,
                generator=gen,
            )
        self._eval_results = results
        return _metrics(results, self.eval_particles if own_run else self.config.num_particles)

    @property
    def eval_particles(self) -> int:
        return self.config.eval_particles or self.config.num_particles

    # -- what the loop saves -----------------------------------------------------------------------------------------

    def save_model(self, directory: Path) -> None:
        save_twist(self.twist, directory, self.target.lm.name, task=self.run_info.get("task"))

    def load_model(self, directory: Path) -> None:
        load_twist_state(self.twist, read_weights(directory))

    def extra_state(self) -> dict:
        return {POSITIVES_KEY: self.positive_source.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if POSITIVES_KEY in state:
            self.positive_source.load_state_dict(state[POSITIVES_KEY])

    def example_samples(self, results: list) -> list[dict]:
        """The step's first few negatives of prompt 0 (draws from the training proposal): text, log φ, ŵ."""
        results = results or getattr(self, "_eval_results", None)  # corpus training: the logged twisted-SIS run
        if not results:
            return []
        first = results[0]
        rows = zip(first.texts, first.log_phi.tolist(), first.normalized_weights.tolist())
        return [{"text": t, "log_phi": lp, "weight": w} for t, lp, w in list(rows)[:EXAMPLES_PER_SNAPSHOT]]

    def output_info(self) -> dict:
        return {"proposal_used": self.proposal}
