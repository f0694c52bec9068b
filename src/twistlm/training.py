"""Training twists: :class:`TwistTrainingConfig` (an ``HfArgumentParser`` dataclass) and :class:`TwistTrainer`.

Each update (MATH.md, "Twist losses"):

1. draw K negatives per prompt from the proposal — p0 (``proposal="base"``) or the current twist-induced proposal
   (``"twisted"``) — by importance sampling (no resampling: i.i.d. draws from q);
2. if the loss needs them, draw positives from a source of :mod:`twistlm.positives`: ``exact`` (enumeration, toy
   problems), ``rejection`` (p0 draws accepted with probability φ), ``smc`` (twisted SMC particles with their
   normalised weights, MATH.md's "approximate positives") or ``buffer`` (replay of every φ > 0 sequence seen, ∝ p0 φ);
3. compute the frozen base LM's features of every prefix once (:func:`~twistlm.twists.features.prefix_features`),
   apply the twist to them *with* grad, and take one optimizer step on the registered loss (:mod:`twistlm.losses`).

Why not a ``transformers.Trainer`` subclass. ``Trainer`` is built around a fixed dataset, a ``DataLoader`` and
``model(**batch).loss``; here every batch is generated on-policy by a sampler that calls the twist under
``inference_mode``, the "model" is a head evaluated on another model's features, and exact resumption needs the
sampler's ``torch.Generator`` state in the checkpoint — overriding ``get_train_dataloader``, ``compute_loss``,
``training_step`` and ``_save_checkpoint`` would leave little of ``Trainer`` but its surprises. Instead this is a
small explicit loop that keeps the parts Hugging Face users know: a dataclass config that ``HfArgumentParser``
parses, ``transformers.TrainerCallback`` callbacks called with a real ``TrainerState`` / ``TrainerControl``
(``on_train_begin``, ``on_step_begin``, ``on_step_end``, ``on_log``, ``on_save``, ``on_train_end``; ``args`` is the
:class:`TwistTrainingConfig`, ``model`` the twist), ``get_scheduler`` learning-rate schedules,
``output_dir/checkpoint-N`` folders with ``save_total_limit``, and an ``accelerate.Accelerator`` for device placement
and ``accelerate launch`` (several processes: each samples with its own seed offset, gradients are averaged with
``accelerator.reduce``, the main process writes files).

Checkpoints (every ``save_steps``) hold the twist, optimizer, scheduler, all RNG states (the sampler's generator,
torch, Python, NumPy), the step and the log history. They are written to a temporary folder and moved into place with
``os.replace``, so a run killed at any moment leaves only complete checkpoints; ``resume=True`` continues from the
newest one and reproduces the uninterrupted run exactly (same seed → same parameters, no lost or repeated steps).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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
from twistlm.smc import run_smc
from twistlm.target import Target
from twistlm.twists.base import Twist
from twistlm.twists.features import prefix_features, prefix_log_psi
from twistlm.twists.io import load_twist_state, read_weights, save_twist

PROPOSALS = ("base", "twisted")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"
CONFIG_NAME = "training_config.json"
HISTORY_NAME = "log_history.json"
POSITIVES_NAME = "positives.pt"
CURVE_NAME = "training_curve.png"
RESUME_KEYS = (
    "loss",
    "seed",
    "num_particles",
    "num_positives",
    "proposal",
    "positives",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "positive_ess_threshold",
    "rejection_particles",
    "buffer_size",
)
"""Settings a resumed run must share with its checkpoint (others, e.g. logging or max_steps, may change)."""


@dataclass
class TwistTrainingConfig:
    """Settings of a twist training run; parse with ``HfArgumentParser(TwistTrainingConfig)``."""

    output_dir: str = field(default="twist-out", metadata={"help": "Where checkpoints and the final twist go."})
    loss: str = field(default="ctl", metadata={"help": "Twist loss: ctl | rl | sixo | fudge."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    max_steps: int = field(default=200, metadata={"help": "Number of optimizer updates."})
    num_particles: int = field(default=32, metadata={"help": "Negatives (proposal samples) per prompt per update."})
    num_positives: int | None = field(default=None, metadata={"help": "Positives per prompt (default: num_particles)."})
    proposal: str | None = field(
        default=None, metadata={"help": "Proposal of the negatives: base | twisted (default: the loss's choice)."}
    )
    positives: str = field(default="smc", metadata={"help": "Positives: exact | smc | rejection | buffer."})
    buffer_size: int = field(default=0, metadata={"help": "Replay buffer capacity per prompt (0: the default)."})
    positive_ess_threshold: float = field(default=0.5, metadata={"help": "κ of the SMC that draws positives."})
    rejection_particles: int | None = field(
        default=None, metadata={"help": "p0 draws per prompt for rejection positives (default: 4 × num_positives)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of every random draw of the run."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "Learning-rate warmup steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm (0: off)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N updates."})
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every N updates (0: only the final twist)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint in output_dir."})
    plot: bool = field(default=True, metadata={"help": "Write training_curve.png at the end."})

    def __post_init__(self) -> None:
        get_loss(self.loss)
        if self.proposal is not None and self.proposal not in PROPOSALS:
            raise ConfigError(f"unknown proposal {self.proposal!r}; choose from: {', '.join(PROPOSALS)}")
        if self.positives not in POSITIVE_SOURCES:
            raise ConfigError(
                f"unknown positives source {self.positives!r}; choose from: {', '.join(POSITIVE_SOURCES)}"
            )
        for name in ("max_steps", "num_particles", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.buffer_size < 0:
            raise ConfigError(f"buffer_size must be ≥ 0, got {self.buffer_size}")
        for name in ("num_positives", "rejection_particles"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {value}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.save_steps < 0:
            raise ConfigError(f"save_steps must be ≥ 0, got {self.save_steps}")
        if not 0.0 <= self.positive_ess_threshold <= 1.0:
            raise ConfigError(f"positive_ess_threshold must lie in [0, 1], got {self.positive_ess_threshold}")

    @property
    def loss_spec(self) -> TwistLoss:
        return get_loss(self.loss)

    @property
    def negative_proposal(self) -> str:
        return self.proposal or self.loss_spec.default_proposal

    @property
    def positives_per_prompt(self) -> int:
        return self.num_positives or self.num_particles

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def _metrics(results, num_particles: int) -> dict[str, float]:
    """log Ẑ, ESS / K and mean φ of an importance-sampling run (means over prompts)."""
    log_z = float(np.mean([r.log_z for r in results]))
    ess = float(np.mean([r.ess[-1] / num_particles if r.ess else 0.0 for r in results]))
    reward = float(torch.cat([r.log_phi for r in results]).exp().mean())
    return {"log_z": log_z, "ess": ess, "mean_reward": reward}


class TwistTrainer:
    """Train ``twist`` for ``target`` with ``config`` (see the module docstring).

    callbacks: ``transformers.TrainerCallback`` instances (or any objects with some of their ``on_*`` methods).
    run_info: extra fields for ``training_config.json`` (task, model, twist kind, ...).
    """

    def __init__(
        self,
        twist: Twist,
        target: Target,
        config: TwistTrainingConfig,
        callbacks: Sequence[Any] = (),
        run_info: dict | None = None,
        accelerator: Any = None,
    ):
        from accelerate import Accelerator
        from transformers import TrainerControl, TrainerState, get_scheduler

        self.twist, self.target, self.config = twist, target, config
        self.loss = config.loss_spec
        self.callbacks = list(callbacks)
        self.run_info = dict(run_info or {})
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
        if self.loss.needs_positives and config.positives in BOUNDED_ONLY and not bounded:
            raise ConfigError(
                f"{config.positives} positives need a potential with 0 ≤ φ ≤ 1 (use positives='smc' or 'buffer')"
            )
        self.positive_source = get_positive_source(
            config.positives if self.loss.needs_positives else "smc", target, config.buffer_size
        )

        self.accelerator = accelerator or Accelerator(cpu=target.lm.device.type == "cpu")
        self.twist.to(self.accelerator.device)
        bind = getattr(twist, "bind_target", None)
        if callable(bind):
            bind(target)
        params = [p for p in twist.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the twist has no trainable parameters")
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps,
        )
        seed = config.seed + 1_000_003 * self.accelerator.process_index
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.state = TrainerState(
            max_steps=config.max_steps,
            logging_steps=config.logging_steps,
            save_steps=config.save_steps,
            log_history=[],
            is_local_process_zero=self.accelerator.is_local_main_process,
            is_world_process_zero=self.accelerator.is_main_process,
        )
        self.control = TrainerControl()
        self._window: list[float] = []
        self.output_dir = Path(config.output_dir)

    # -- callbacks ---------------------------------------------------------------------------------------------------

    def add_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def _event(self, name: str, **kwargs: Any) -> None:
        for cb in self.callbacks:
            hook = getattr(cb, name, None)
            if callable(hook):
                result = hook(
                    self.config,
                    self.state,
                    self.control,
                    model=self.twist,
                    optimizer=self.optimizer,
                    lr_scheduler=self.scheduler,
                    **kwargs,
                )
                if result is not None and hasattr(result, "should_training_stop"):
                    self.control = result

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

    def _rollouts(self, samples: Samples, feats, proposal: str) -> Rollouts:
        log_psi_all = prefix_log_psi(self.twist, feats)
        B = self.target.num_prompts
        return make_rollouts(feats, log_psi_all, samples.log_phi, B, log_weight=samples.log_weight, proposal=proposal)

    def _features(self, samples: Samples):
        """Frozen base-LM features of every prefix of ``samples`` (B groups of equal size, row b·n + j)."""
        target = self.target
        n = len(samples.sequences) // target.num_prompts
        index = [i // n for i in range(len(samples.sequences))]
        return prefix_features(
            target.lm, target.prompt_ids, samples.sequences, prompt_index=index, max_new_tokens=target.max_new_tokens
        )

    def compute_loss(self, negatives: Samples, positives: Samples | None) -> torch.Tensor:
        """The configured loss on stored samples (base-LM features without grad; the twist with grad)."""
        neg = self._rollouts(negatives, self._features(negatives), self.proposal)
        pos = None
        if positives is not None:
            # The positives' proposal does not enter any loss (only their data weights do).
            pos = self._rollouts(positives, self._features(positives), "base")
        return self.loss.compute(neg, pos, self.generator)

    def training_step(self) -> tuple[float, list]:
        """Sample, compute the loss, take one optimizer step; returns the loss and the negatives' results."""
        self.twist.train()
        negatives, results = self._negatives()
        if self.loss.needs_positives:  # SIS negatives: log_weights = log σ̃(s) − log q(s) exactly
            self.positive_source.observe(negatives, torch.stack([r.log_weights.double() for r in results]))
        positives = self._positives()
        loss = self.compute_loss(negatives, positives)
        self.accelerator.backward(loss)
        if self.accelerator.num_processes > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self._event("on_pre_optimizer_step")
        self.optimizer.step()
        self._event("on_optimizer_step")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ConfigError(
                f"the {self.loss.name} loss is {value} at step {self.state.global_step + 1} "
                "(lower the learning rate, or check the potential)"
            )
        return value, results

    def _eval_metrics(self, results: list) -> dict[str, float]:
        """log Ẑ, ESS and mean φ of the twisted proposal (reuses the negatives when they came from it).

        Otherwise runs an extra importance-sampling pass with a generator of its own, seeded by (seed, step), so
        logging never changes the training trajectory.
        """
        if self.proposal != "twisted":
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.state.global_step)
            results = run_smc(
                self.target,
                self.config.num_particles,
                proposal="twisted",
                twist=self.twist,
                ess_threshold=0.0,
                generator=gen,
            )
        return _metrics(results, self.config.num_particles)

    # -- the loop ----------------------------------------------------------------------------------------------------

    def train(self) -> Any:
        """Run up to ``max_steps`` updates (continuing from a checkpoint with ``resume``); returns the TrainerState."""
        cfg = self.config
        if cfg.resume:
            self._resume()
        self._event("on_train_begin")
        start = time.perf_counter()
        while self.state.global_step < cfg.max_steps and not self.control.should_training_stop:
            self._event("on_step_begin")
            value, results = self.training_step()
            self.state.global_step += 1
            self.state.epoch = self.state.global_step / cfg.max_steps
            self._window.append(value)
            self._event("on_step_end")
            step = self.state.global_step
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                self.log(self._eval_metrics(results))
            if cfg.save_steps and step % cfg.save_steps == 0:
                self.save_checkpoint()
        self.state.train_runtime = time.perf_counter() - start
        self.save_outputs()
        self._event("on_train_end")
        return self.state

    def log(self, metrics: dict[str, float]) -> None:
        logs = {
            "loss": float(np.mean(self._window)) if self._window else float("nan"),
            **metrics,
            "learning_rate": float(self.scheduler.get_last_lr()[0]),
            "step": self.state.global_step,
        }
        self._window = []
        self.state.log_history.append(logs)
        self._event("on_log", logs=logs)

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def _rng_state(self) -> dict:
        state = {
            "generator": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def save_checkpoint(self) -> Path | None:
        """Write ``output_dir/checkpoint-N`` atomically (temporary folder + ``os.replace``)."""
        if not self.accelerator.is_main_process:
            return None
        step = self.state.global_step
        self.output_dir.mkdir(parents=True, exist_ok=True)
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_twist(self.twist, tmp / "twist", self.target.lm.name, task=self.run_info.get("task"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(self._rng_state(), tmp / "rng_state.pt")
        torch.save(self.positive_source.state_dict(), tmp / POSITIVES_NAME)
        state = {
            "global_step": step,
            "log_history": self.state.log_history,
            "loss_window": self._window,
            "config": self.config.to_dict(),
        }
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2))
        if final.exists():
            old = self.output_dir / f".old-checkpoint-{step}-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        self._rotate_checkpoints()
        self._event("on_save", checkpoint=str(final))
        return final

    def _rotate_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if not limit:
            return
        for old in list_checkpoints(self.output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> None:
        for stale in self.output_dir.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a run killed while writing: never complete, never read
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            return
        ckpt = checkpoints[-1]
        saved = json.loads((ckpt / STATE_NAME).read_text())
        mine = self.config.to_dict()
        changed = [k for k in RESUME_KEYS if saved["config"].get(k) != mine.get(k)]
        if changed:
            raise ConfigError(
                f"cannot resume from {ckpt}: it was trained with different settings ("
                + ", ".join(f"{k}={saved['config'].get(k)!r} vs {mine.get(k)!r}" for k in changed)
                + ")"
            )
        load_twist_state(self.twist, read_weights(ckpt / "twist"))
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        self._set_rng_state(torch.load(ckpt / "rng_state.pt", weights_only=False))
        if (ckpt / POSITIVES_NAME).is_file():
            self.positive_source.load_state_dict(torch.load(ckpt / POSITIVES_NAME, weights_only=True))
        self.state.global_step = int(saved["global_step"])
        self.state.log_history = list(saved["log_history"])
        self._window = list(saved.get("loss_window", []))

    def save_outputs(self) -> None:
        """The final twist, the run's configuration, the log history and (``plot``) the training curves."""
        if not self.accelerator.is_main_process:
            return
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        save_twist(self.twist, out, self.target.lm.name, task=self.run_info.get("task"))
        config = {**self.config.to_dict(), "proposal_used": self.proposal, **self.run_info}
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
        (out / HISTORY_NAME).write_text(json.dumps(self.state.log_history, indent=2))
        if self.config.plot:
            plot_training_curves(self.state.log_history, out / CURVE_NAME)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def plot_training_curves(log_history: list[dict], path: str | os.PathLike) -> Path:
    """Loss, log Ẑ, ESS / K and mean φ against the step, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("log_z", "log Ẑ (twisted SIS)"), ("ess", "ESS / K"), ("mean_reward", "mean φ")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(e["step"], e[key]) for e in log_history if key in e and e[key] is not None and math.isfinite(e[key])]
        if pts:
            ax.plot(*zip(*pts), marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
