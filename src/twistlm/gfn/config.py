"""``GFNConfig``: the settings of a GFlowNet fine-tuning run (an ``HfArgumentParser`` dataclass).

Defaults are the tuned recipe for the embedded model on this machine (EXPERIMENTS.md, "GFlowNet fine-tuning"); a task
may override the length bounds and the reward-temperature schedule through its GFN problem
(:mod:`twistlm.gfn.problems`). Exploration follows REFERENCES (B): each update draws its trajectories from the replay
buffer with probability ``replay_prob`` (falling through when a prompt has none yet), from the policy at a temperature
τ ~ U[``temperature_low``, ``temperature_high``] with probability ``tempered_prob``, else on-policy (τ = 1); ε-mixing
with uniform actions is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twistlm.errors import ConfigError
from twistlm.gfn.objectives import get_objective
from twistlm.trainloop import LoopConfig

DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"


@dataclass
class GFNConfig(LoopConfig):
    """GFlowNet fine-tuning settings (module docstring); the loop's own fields come from ``LoopConfig``."""

    output_dir: str = field(default="gfn-out", metadata={"help": "Where checkpoints and the final adapter go."})
    objective: str = field(default="subtb", metadata={"help": "subtb | tb | vargrad | sft."})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate of the LoRA adapter."})
    max_steps: int = field(default=80, metadata={"help": "Number of optimizer updates."})
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata={"help": "transformers scheduler name."})
    warmup_steps: int = field(default=10, metadata={"help": "Learning-rate warmup steps."})
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW β2."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    save_steps: int = field(default=20, metadata={"help": "Checkpoint every N updates (0: only the final adapter)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N updates."})
    prompts_per_step: int = field(default=4, metadata={"help": "Prompts (dataset rows) per update."})
    samples_per_prompt: int = field(default=4, metadata={"help": "Trajectories per prompt per update."})
    subtb_lambda: float = field(default=1.0, metadata={"help": "λ of modified SubTB (weight λ^(j−i) per span)."})
    log_z_learning_rate: float = field(default=0.1, metadata={"help": "Learning rate of TB's log Z table."})
    min_len: int | None = field(default=None, metadata={"help": "Fewest actions before ⊤ (default: the task's)."})
    max_len: int | None = field(default=None, metadata={"help": "Most actions; ⊤ is forced there (task default)."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA α."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_targets: str = field(default=DEFAULT_LORA_TARGETS, metadata={"help": "Comma-separated module names."})
    replay_prob: float = field(default=0.25, metadata={"help": "Share of updates drawn from the replay buffer."})
    tempered_prob: float = field(default=0.5, metadata={"help": "Share of updates sampled at a random temperature."})
    temperature_low: float = field(default=0.5, metadata={"help": "Lowest behaviour temperature."})
    temperature_high: float = field(default=2.0, metadata={"help": "Highest behaviour temperature."})
    epsilon: float = field(default=0.0, metadata={"help": "ε-mixing with uniform actions (behaviour only)."})
    buffer_capacity: int = field(default=50, metadata={"help": "Replay trajectories kept per prompt."})
    dedup_distance: float = field(default=0.25, metadata={"help": "Edit-distance share under which two are equal."})
    reward_floor: float = field(default=-100.0, metadata={"help": "Lowest log R (φ = 0 maps here)."})
    reward_temp_start: float | None = field(default=None, metadata={"help": "Reward temperature at step 0 (task)."})
    reward_temp_end: float | None = field(default=None, metadata={"help": "Reward temperature after the ramp."})
    reward_temp_steps: int | None = field(default=None, metadata={"help": "Length of the linear ramp (steps)."})

    resume_keys = LoopConfig.resume_keys + (
        "objective",
        "prompts_per_step",
        "samples_per_prompt",
        "subtb_lambda",
        "min_len",
        "max_len",
        "lora_r",
        "lora_alpha",
        "lora_targets",
        "replay_prob",
        "tempered_prob",
        "buffer_capacity",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        get_objective(self.objective)
        for name in ("prompts_per_step", "samples_per_prompt", "lora_r", "buffer_capacity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("replay_prob", "tempered_prob", "epsilon"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.objective == "vargrad" and self.samples_per_prompt < 2:
            raise ConfigError("objective 'vargrad' needs samples_per_prompt ≥ 2 (a variance over each prompt's samples)")
        if self.replay_prob + self.tempered_prob > 1.0:
            raise ConfigError("replay_prob + tempered_prob must not exceed 1")
        if not 0 < self.temperature_low <= self.temperature_high:
            raise ConfigError("need 0 < temperature_low ≤ temperature_high")
        if not 0 < self.subtb_lambda <= 1:
            raise ConfigError(f"subtb_lambda must lie in (0, 1], got {self.subtb_lambda}")
        for name in ("reward_temp_start", "reward_temp_end"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")

    @property
    def lora_target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_targets.split(",") if m.strip()]
