"""``GFNTrainer``: GFlowNet fine-tuning of a policy over a dataset of prompts (MATH.md, "Amortized inference").

Each update:

1. draw ``prompts_per_step`` prompts (rows of the problem's target) with the run's generator;
2. get ``samples_per_prompt`` trajectories per prompt — from the replay buffer, from the policy at a random
   temperature, or on-policy (:class:`~twistlm.gfn.config.GFNConfig`); the ``sft`` objective uses the given
   (labelled) trajectories instead;
3. score every state with the frozen base (the adapter disabled): log R(s_i ⊤) / T_R, T_R the reward temperature of
   this step (linear ramp);
4. score every state with the policy, with grad (one forward over the batch): the untempered, restricted
   log q(action) and log q(⊤) (:class:`~twistlm.gfn.sampling.ActionSpace`), whatever distribution drew the batch;
5. one optimizer step on the objective (:mod:`twistlm.gfn.objectives`); sampled trajectories enter the buffer with
   their untempered final reward.

Given trajectories (labelled rationales) seed the buffer once, at the start of a fresh run. The loop machinery —
callbacks, schedule, accelerate, checkpoints with the adapter, optimizer, scheduler, buffer, log Z and all RNG
states, exact resume — is :class:`twistlm.trainloop.TrainLoop`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from twistlm.conditioning import get_condition
from twistlm.errors import ConfigError
from twistlm.gfn.config import GFNConfig
from twistlm.gfn.objectives import get_objective
from twistlm.gfn.policy import CONDITION_KEY
from twistlm.gfn.replay import ReplayBuffer
from twistlm.gfn.rewards import reward_for
from twistlm.gfn.sampling import ActionSpace, sample_trajectories
from twistlm.gfn.trajectories import StateBatch, Trajectories, state_index
from twistlm.resampling import log_mean_exp
from twistlm.target import Target
from twistlm.trainloop import EXAMPLES_PER_SNAPSHOT, TrainLoop, make_accelerator

BUFFER_KEY = "buffer"
LOG_Z_KEY = "log_z"
SEEDED_KEY = "seeded"
SEED_CHUNK = 32
"""Labelled trajectories scored per reward pass when seeding the buffer (935 Story Cloze sentences in chunks of 4
took ≈ 30 min of one busy core; the buffer's contents do not depend on the chunking)."""


@dataclass
class GivenTrajectory:
    """A labelled trajectory for one prompt: tokens (actions and forced), forced flags, and the stop token."""

    tokens: list[int]
    forced: list[bool]
    stop_token: int


@dataclass
class GFNProblem:
    """What a task hands the trainer: the target over *all* training prompts, the action space, the labelled
    trajectories by prompt index, the reward-temperature ramp (start, end, steps), facts for the policy's JSON,
    ``condition``: what the policy reads (a name in :data:`twistlm.conditioning.CONDITIONS`), and
    ``config``: the task's recipe — :class:`~twistlm.gfn.config.GFNConfig` values that replace the config's defaults
    where the user gave none (``train-gfn`` applies them; explicit flags win), and ``buffer_seeds``: more
    trajectories by prompt index that only enter the replay buffer at the start (plausible, unlabelled; the given
    ones enter it too)."""

    target: Target
    space: ActionSpace
    given: dict[int, GivenTrajectory] = field(default_factory=dict)
    reward_temperature: tuple[float, float, int] = (1.0, 1.0, 1)
    info: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    condition: str = "prompt"
    buffer_seeds: dict[int, list[GivenTrajectory]] = field(default_factory=dict)


def reward_temperature(config: GFNConfig, problem: GFNProblem, step: int) -> float:
    """T_R at ``step``: linear from start to end over ``steps`` updates, then constant (config overrides task)."""
    start, end, steps = problem.reward_temperature
    start = config.reward_temp_start if config.reward_temp_start is not None else start
    end = config.reward_temp_end if config.reward_temp_end is not None else end
    steps = config.reward_temp_steps if config.reward_temp_steps is not None else steps
    frac = min(1.0, step / max(1, steps))
    return start + (end - start) * frac


class GFNTrainer(TrainLoop):
    """Train ``policy`` (a :class:`~twistlm.gfn.policy.LoRAPolicy` or any object with its members) on ``problem``."""

    curve_panels = (
        ("loss", "loss"),
        ("log_reward", "mean log R (untempered)"),
        ("log_z", "log Ẑ (on-policy IS)"),
        ("policy_log_q", "mean log q(z ⊤)"),
        ("diversity", "distinct share"),
        ("reward_temperature", "reward temperature"),
    )

    def __init__(self, policy: Any, problem: GFNProblem, config: GFNConfig, *, callbacks: Sequence[Any] = (),
                 run_info: dict | None = None, accelerator: Any = None):
        self.policy, self.problem = policy, problem
        self.model = policy
        self.objective = get_objective(config.objective)
        target = problem.target
        space = problem.space
        if config.min_len is not None or config.max_len is not None:
            space = ActionSpace(
                space.allowed,
                space.stop_ids,
                space.min_len if config.min_len is None else config.min_len,
                space.max_len if config.max_len is None else config.max_len,
            )
        self.space = space
        self.condition = get_condition(problem.condition)
        self.reward = reward_for(target, space.stop_ids, config.reward_floor)
        if self.objective.needs_prefix_rewards and not self.reward.prefix_defined:
            raise ConfigError(
                f"objective {config.objective!r} needs rewards on every prefix, but potential "
                f"{target.potential.name!r} is not defined on prefixes (use objective tb)"
            )
        if self.objective.name == "sft" and not problem.given:
            raise ConfigError("objective 'sft' needs labelled trajectories, and this problem has none")
        self.buffer = ReplayBuffer(config.buffer_capacity, config.dedup_distance)
        self.log_z = torch.nn.Parameter(torch.zeros(target.num_prompts, dtype=torch.float64))
        groups: list[dict] = [{"params": list(policy.parameters())}]
        if self.objective.needs_log_z:
            groups.append({"params": [self.log_z], "lr": config.log_z_learning_rate})
        if accelerator is None:
            accelerator = make_accelerator(cpu=target.lm.device.type == "cpu")
        super().__init__(config, groups, callbacks=callbacks, run_info=run_info, accelerator=accelerator)
        self._seeded = False

    # -- batches -----------------------------------------------------------------------------------------------------

    def _draw_prompts(self, pool: Sequence[int]) -> list[int]:
        k = self.config.prompts_per_step
        pick = torch.randint(0, len(pool), (k,), generator=self.generator)
        return [int(pool[i]) for i in pick]

    def _given(self, keys: list[int]) -> Trajectories:
        trajs = Trajectories([], [], [], [], [], [])
        for b, key in enumerate(keys):
            g = self.problem.given[key]
            for _ in range(self.config.samples_per_prompt):
                trajs = trajs.concat(Trajectories([list(g.tokens)], [list(g.forced)], [b], [g.stop_token >= 0],
                                                  [g.stop_token], ["given"]))
        return trajs

    def _trajectories(self, keys: list[int], sub: Target) -> tuple[Trajectories, str, float]:
        cfg = self.config
        if self.objective.name == "sft":
            return self._given(keys), "given", 1.0
        u = float(torch.rand((), generator=self.generator))
        if u < cfg.replay_prob:
            replay = self.buffer.sample(keys, cfg.samples_per_prompt, self.generator, self._reward_temp())
            if replay is not None:
                return replay, "replay", 1.0
        tau = 1.0
        if cfg.replay_prob <= u < cfg.replay_prob + cfg.tempered_prob:
            r = float(torch.rand((), generator=self.generator))
            tau = cfg.temperature_low + (cfg.temperature_high - cfg.temperature_low) * r
        mode = "policy" if tau == 1.0 else "tempered"
        trajs = sample_trajectories(
            self.policy.lm, self.condition(sub), cfg.samples_per_prompt, self.space, self.generator,
            temperature=tau, epsilon=cfg.epsilon, tool=sub.tool, source=mode,
        )
        return trajs, mode, tau

    def _reward_temp(self) -> float:
        return reward_temperature(self.config, self.problem, self.state.global_step)

    def score(self, trajs: Trajectories, sub: Target) -> tuple[StateBatch, torch.Tensor]:
        """The batch's StateBatch (policy terms with grad; rewards / T_R) and the untempered log R (n, S)."""
        states, terminable, last = state_index(trajs, self.space.min_len, self.space.stop_after_tool)
        if self.objective.uses_rewards:
            with self.policy.base() as base_lm:
                log_r = reward_for(sub, self.space.stop_ids, self.config.reward_floor)(base_lm, trajs, states, terminable)
        else:
            log_r = torch.zeros(terminable.shape, dtype=torch.float64)
        rows = torch.tensor([i for i, st in enumerate(states) for _ in st])
        slots = torch.tensor([a for st in states for a in range(len(st))])
        cols = torch.tensor([m for st in states for m in st])
        logp = self.policy.log_probs_at(self.condition(sub), trajs, rows, cols)
        after_tool = torch.tensor([m > 0 and trajs.forced[i][m - 1] for i, st in enumerate(states) for m in st])
        logq = self.space.log_probs(logp, slots, after_tool)
        n, S = terminable.shape
        stops = torch.tensor(self.space.stop_ids, device=logq.device)
        # log q(⊤) only where stopping is an action: elsewhere every stop entry is −∞ and logsumexp's gradient NaN.
        can_stop = self.space.can_stop(slots, after_tool).to(logq.device)
        stop_in = torch.where(can_stop[:, None], logq[:, stops], torch.zeros_like(logq[:, stops]))
        stop_lp_flat = torch.where(can_stop, torch.logsumexp(stop_in, dim=-1), torch.zeros_like(stop_in[:, 0]))
        next_tok = torch.tensor(
            [trajs.tokens[i][st[a]] if a + 1 < len(st) else self.space.stop_ids[0]
             for i, st in enumerate(states) for a in range(len(st))],
            device=logq.device,
        )
        act_flat = logq.gather(1, next_tok[:, None]).squeeze(1)
        is_last = torch.tensor([a + 1 == len(st) for st in states for a in range(len(st))], device=logq.device)
        cut = torch.tensor([not trajs.stopped[i] and a + 1 == len(st) and a >= self.space.max_len
                            for i, st in enumerate(states) for a in range(len(st))], device=logq.device)
        dtype = torch.float64
        action_lp = torch.zeros(n, S, dtype=dtype, device=logq.device)
        stop_lp = torch.zeros(n, S, dtype=dtype, device=logq.device)
        flat = (rows * S + slots).to(logq.device)
        action_lp = action_lp.view(-1).index_put((flat,), torch.where(is_last, 0.0, act_flat).to(dtype)).view(n, S)
        stop_vals = torch.where(cut, 0.0, stop_lp_flat).to(dtype)
        stop_lp = stop_lp.view(-1).index_put((flat,), stop_vals).view(n, S)
        # Non-terminable states: their stop term never enters an objective; keep it finite.
        stop_lp = torch.where(terminable.to(stop_lp.device), stop_lp, torch.zeros_like(stop_lp))
        temp = self._reward_temp()
        batch = StateBatch(action_lp=action_lp, stop_lp=stop_lp, log_reward=(log_r / temp).to(stop_lp.device),
                           terminable=terminable.to(stop_lp.device), last=last.to(stop_lp.device),
                           group=torch.tensor(trajs.prompt_index, device=stop_lp.device))
        return batch, log_r

    # -- one update --------------------------------------------------------------------------------------------------

    def _seed_buffer(self) -> None:
        """Labelled trajectories and the problem's buffer seeds enter the buffer once, at the start of a fresh run,
        with their rewards."""
        self._seeded = True
        if not self.objective.uses_rewards:
            return
        pairs = [(key, g) for key, g in sorted(self.problem.given.items())]
        pairs += [(key, g) for key, seeds in sorted(self.problem.buffer_seeds.items()) for g in seeds]
        chunk = max(self.config.prompts_per_step, SEED_CHUNK)
        for k in range(0, len(pairs), chunk):
            part = pairs[k : k + chunk]
            keys = sorted({key for key, _ in part})
            sub = self.problem.target.select(keys)
            trajs = Trajectories([], [], [], [], [], [])
            for key, g in part:
                trajs = trajs.concat(Trajectories([g.tokens], [g.forced], [keys.index(key)], [g.stop_token >= 0],
                                                  [g.stop_token]))
            states, terminable, last = state_index(trajs, self.space.min_len, self.space.stop_after_tool)
            with self.policy.base() as base_lm:
                log_r = reward_for(sub, self.space.stop_ids, self.config.reward_floor)(base_lm, trajs, states, terminable)
            final = log_r.gather(1, last[:, None]).squeeze(1)
            self.buffer.add_batch(keys, trajs, final)

    def training_step(self) -> tuple[float, dict]:
        if not self._seeded:
            self._seed_buffer()
        cfg = self.config
        self.policy.train()
        pool = sorted(self.problem.given) if self.objective.name == "sft" else range(self.problem.target.num_prompts)
        keys = self._draw_prompts(list(pool))
        sub = self.problem.target.select(keys)
        trajs, mode, _ = self._trajectories(keys, sub)
        batch, log_r = self.score(trajs, sub)
        extra = {}
        if self.objective.needs_log_z:
            extra["log_z"] = self.log_z[torch.tensor(keys)[torch.tensor(trajs.prompt_index)]].to(batch.stop_lp.device)
        loss, terms = self.objective.compute(batch, lam=cfg.subtb_lambda, **extra)
        value = self.optimizer_step(loss, terms)
        final = log_r.gather(1, batch.last.cpu()[:, None]).squeeze(1)
        if mode != "given" and self.objective.uses_rewards:
            self.buffer.add_batch(keys, trajs, final)
        info = {"batch": batch, "final": final, "trajs": trajs, "mode": mode, "keys": keys}
        return value, info

    def eval_metrics(self, info: dict) -> dict[str, float]:
        """Metrics of the step's batch: mean untempered log R, policy log q, log Ẑ (on-policy batches only), share
        of distinct trajectories per prompt, mean number of actions, and the reward temperature."""
        batch, final, trajs = info["batch"], info["final"], info["trajs"]
        log_q = batch.trajectory_log_q().detach().double().cpu()
        out = {
            "log_reward": float(final.mean()),
            "policy_log_q": float(log_q.mean()),
            "reward_temperature": self._reward_temp(),
            "length": float(sum(trajs.num_actions(i) for i in range(len(trajs))) / max(1, len(trajs))),
        }
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(trajs.prompt_index):
            groups.setdefault(b, []).append(i)
        out["diversity"] = float(
            sum(len({tuple(trajs.tokens[i]) for i in rows}) / len(rows) for rows in groups.values()) / len(groups)
        )
        if info["mode"] == "policy":
            est = [float(log_mean_exp((final[rows] - log_q[rows])[None])[0]) for rows in groups.values()]
            out["log_z"] = float(sum(est) / len(est))
        else:
            out["log_z"] = math.nan
        return out

    def example_samples(self, info: dict) -> list[dict]:
        """The step's first few trajectories (tool tokens included): text, untempered log R, where it came from."""
        trajs, final = info["trajs"], info["final"].tolist()
        decode = self.problem.target.lm.decode
        return [{"text": decode(trajs.tokens[i]), "log_reward": final[i], "source": trajs.source[i]}
                for i in range(min(EXAMPLES_PER_SNAPSHOT, len(trajs)))]

    # -- what the loop saves -----------------------------------------------------------------------------------------

    def save_model(self, directory: Path) -> None:
        extra = {**self.problem.info, CONDITION_KEY: self.problem.condition}
        self.policy.save_pretrained(directory, task=self.run_info.get("task"), extra=extra, space=self.space)

    def load_model(self, directory: Path) -> None:
        self.policy.load_weights(directory)

    def extra_state(self) -> dict:
        return {BUFFER_KEY: self.buffer.state_dict(), LOG_Z_KEY: self.log_z.detach().clone(), SEEDED_KEY: self._seeded}

    def load_extra_state(self, state: dict) -> None:
        self.buffer.load_state_dict(state[BUFFER_KEY])
        with torch.no_grad():
            self.log_z.copy_(state[LOG_Z_KEY])
        self._seeded = bool(state.get(SEEDED_KEY, True))
