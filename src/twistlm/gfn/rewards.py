"""Rewards log R(s_i ⊤) at every state of a batch of trajectories, from the frozen base p0 (MATH.md, "Amortized
inference").

Every reward is built from a twistlm :class:`~twistlm.target.Target` — the same target SMC and ``evaluate`` use — so
the GFlowNet's goal q_θ(z ⊤) ∝ R(z ⊤) is that target's σ (restricted to the policy's allowed vocabulary). With
``cum_m = Σ log p0(z_k | x, z_<k)`` over the *actions* among z_1:m (tool-forced tokens have probability 1 under the
tool-augmented p0, as in :mod:`twistlm.tools`):

* :class:`LikelihoodReward` (latent variables: infilling, arithmetic answers, labels; potential φ = p0(y | x, z ⊤)):
  log R(z_1:m ⊤) = cum_m + log p0(⊤ y | x, z_1:m) — the stop token then the observation y, scored for every m in
  one packed forward (:func:`~twistlm.gfn.scoring.suffix_at_states`); at a cut (below) log p0(y | x, z_1:T);
* :class:`JudgedLikelihoodReward` (the same with a penalty when p0 then prefers a wrong label, SUBJ's E-step);
* :class:`TemperedReward` (φ = p0^{1/τ−1}): log R = (cum_m + log p0(⊤ | x, z_1:m)) / τ, ⊤ the set of stop tokens;
* :class:`PotentialReward` (any other potential): log R = cum_m + log p0(⊤ | x, z_1:m) + log φ(z_1:m).

  A trajectory cut at the maximum length T has no stop factor at its last state: the target truncates there
  (p0(s | x) of a particle that reaches T without stopping is the product of its T tokens), so σ ∝ R is exactly the
  sampler's σ over finished sequences, as SMC and ``evaluate`` use it. Only potentials
  that declare ``prefix_defined = True`` (meaningful on every prefix, e.g. a classifier) give rewards at every state;
  otherwise only the final state is scored and only trajectory balance can use the reward.

Rewards are floored (default :data:`LOG_REWARD_FLOOR`, ``GFNConfig.reward_floor``) so that φ = 0 (log R = −∞) gives a
finite, very small reward. The floor must lie well below the rewards that matter: for long tempered continuations
(log R = log p0 / τ of −100 … −300) the default flattens every reward (EXPERIMENTS.md, tempered continuation).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from twistlm.errors import ConfigError
from twistlm.gfn.scoring import gather_logprobs, prefix_pass, stop_logprobs, suffix_at_states
from twistlm.gfn.trajectories import Trajectories
from twistlm.lm import ParticleLM
from twistlm.potentials.judged import JudgedObservationPotential
from twistlm.potentials.likelihood import InfillingPotential, TemperedPotential
from twistlm.target import Target

LOG_REWARD_FLOOR = -100.0
"""log R is clamped to at least this value (φ = 0 becomes e^−100, as the reference's −99 penalty)."""


def action_cumsum(lm: ParticleLM, ppass, trajs: Trajectories, states: Sequence[Sequence[int]]) -> torch.Tensor:
    """cum_m of the module docstring at every state, (n, S) float64."""
    rows, cols, toks = [], [], []
    for i, (seq, fl) in enumerate(zip(trajs.tokens, trajs.forced)):
        for k, (tok, f) in enumerate(zip(seq, fl)):
            if not f:
                rows.append(i)
                cols.append(k)
                toks.append(tok)
    per_token = torch.zeros(len(trajs), max((len(t) for t in trajs.tokens), default=0) + 1, dtype=torch.float64)
    if rows:
        lp = gather_logprobs(lm, ppass, torch.tensor(rows), torch.tensor(cols), torch.tensor(toks)).double()
        per_token[torch.tensor(rows), torch.tensor(cols) + 1] = lp
    cum = per_token.cumsum(dim=1)
    S = max(len(s) for s in states)
    out = torch.zeros(len(trajs), S, dtype=torch.float64)
    for i, st in enumerate(states):
        out[i, : len(st)] = cum[i, torch.tensor(st)]
    return out


def _flat_states(states: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = torch.tensor([i for i, st in enumerate(states) for _ in st])
    cols = torch.tensor([m for st in states for m in st])
    slot = torch.tensor([a for st in states for a in range(len(st))])
    return rows, cols, slot


class PrefixReward(ABC):
    """log R at every state; ``prefix_defined``: whether non-final states get real rewards (SubTB needs them)."""

    name = "reward"
    prefix_defined = True

    def __init__(self, target: Target, stop_ids: Sequence[int], floor: float = LOG_REWARD_FLOOR):
        self.target = target
        self.stop_ids = tuple(stop_ids)
        self.floor = float(floor)

    @torch.no_grad()
    def __call__(self, lm: ParticleLM, trajs: Trajectories, states: Sequence[Sequence[int]],
                 terminable: torch.Tensor | None = None) -> torch.Tensor:
        """(n, S) float64 log R(s_i ⊤) under the base model ``lm`` (the caller disables the policy's adapter).

        ``terminable`` (n, S): only these states are scored (the others, where ⊤ is no action, get the floor)."""
        prompts = self.target.prompt_ids
        ppass = prefix_pass(lm, prompts, trajs.prompt_index, trajs.tokens)
        full = action_cumsum(lm, ppass, trajs, states)
        if terminable is None:
            terminable = torch.ones(full.shape, dtype=torch.bool)
            for i, st in enumerate(states):
                terminable[i, len(st):] = False
        chosen = [[a for a in range(len(st)) if terminable[i, a]] for i, st in enumerate(states)]
        sub_states = [[st[a] for a in c] for st, c in zip(states, chosen)]
        cum = torch.zeros(full.shape[0], max(len(c) for c in chosen), dtype=torch.float64)
        for i, c in enumerate(chosen):
            cum[i, : len(c)] = full[i, c]
        part = self.compute(lm, ppass, trajs, sub_states, cum)
        out = torch.full(full.shape, self.floor, dtype=torch.float64)
        for i, c in enumerate(chosen):
            out[i, c] = part[i, : len(c)]
        return out.clamp(min=self.floor)

    def stop_term(self, lm, ppass, trajs, states) -> torch.Tensor:
        """log p0(⊤ | x, z_1:m) at every state, except the final state of a trajectory cut at its maximum length:
        the target truncates there (a particle that has not stopped by T finishes at T, with no stop factor in
        p0(s | x)), so R(z_1:T) = p0(z_1:T | x) φ(z_1:T) and σ ∝ R is the sampler's σ."""
        rows, cols, slot = _flat_states(states)
        out = torch.zeros(len(states), max(len(s) for s in states), dtype=torch.float64)
        out[rows, slot] = stop_logprobs(lm, ppass, rows, cols, self.stop_ids).double()
        for i, st in enumerate(states):
            if not trajs.stopped[i] and st and st[-1] == len(trajs.tokens[i]):
                out[i, len(st) - 1] = 0.0
        return out

    @abstractmethod
    def compute(self, lm, ppass, trajs, states, cum) -> torch.Tensor: ...


class LikelihoodReward(PrefixReward):
    name = "likelihood"

    def __init__(self, target: Target, stop_ids: Sequence[int], floor: float = LOG_REWARD_FLOOR):
        super().__init__(target, stop_ids, floor)
        potential = target.potential
        kept = [s for s in stop_ids if not (target.stop_at_eos and s == target.lm.eos_token_id)]
        if len(stop_ids) != 1:
            raise ConfigError(
                f"a likelihood reward needs exactly one stop token (the text before the observation), got {len(stop_ids)}"
            )
        self.feed_stop = list(kept)  # an EOS stop is not part of the text: the observation follows z directly
        # one empty sequence per prompt: what the potential reads its per-prompt observations from
        self.empty = target.sequences([[] for _ in target.prompt_ids], list(range(target.num_prompts)))
        self.observations = [list(o) for o in potential.observations(self.empty)]

    def observation_term(self, lm, ppass, trajs, states, observations) -> torch.Tensor:
        """log p0(⊤ o_i | x, z_1:m) at every state for the observation o_i of each trajectory — except at the final
        state of a trajectory cut at its maximum length, where the target truncates (no stop): log p0(o_i | x, z_1:T),
        so that σ ∝ R is the sampler's σ there too."""
        out = suffix_at_states(lm, ppass, states, [self.feed_stop + list(o) for o in observations])
        if not self.feed_stop:
            return out
        cut = [[st[-1]] if not trajs.stopped[i] and st and st[-1] == len(trajs.tokens[i]) else []
               for i, st in enumerate(states)]
        if any(cut):
            at_cut = suffix_at_states(lm, ppass, cut, [list(o) for o in observations])
            for i, c in enumerate(cut):
                if c:
                    out[i, len(states[i]) - 1] = at_cut[i, 0]
        return out

    def compute(self, lm, ppass, trajs, states, cum):
        return cum + self.observation_term(lm, ppass, trajs, states, [self.observations[b] for b in trajs.prompt_index])


class JudgedLikelihoodReward(LikelihoodReward):
    """The likelihood reward with the judged potential's penalty (:mod:`twistlm.potentials.judged`) at every state:
    log R(z_1:m ⊤) = cum_m + log p0(⊤ o_y | x, z_1:m) − λ·1[some p0(⊤ o_l | x, z_1:m) > p0(⊤ o_y | x, z_1:m)]."""

    name = "judged-likelihood"

    def __init__(self, target: Target, stop_ids: Sequence[int], floor: float = LOG_REWARD_FLOOR):
        super().__init__(target, stop_ids, floor)
        self.alternatives = [[list(o) for o in alts] for alts in target.potential.alternatives(self.empty)]

    def compute(self, lm, ppass, trajs, states, cum):
        potential, rows = self.target.potential, trajs.prompt_index
        true_lp = self.observation_term(lm, ppass, trajs, states, [self.observations[b] for b in rows])
        alt_lps = [self.observation_term(lm, ppass, trajs, states, [self.alternatives[b][j] for b in rows])
                   for j in range(len(self.alternatives[0]) if potential.penalty > 0 else 0)]
        return cum + true_lp - potential.penalty * potential.wrong(true_lp, alt_lps)


class TemperedReward(PrefixReward):
    name = "tempered"

    def __init__(self, target: Target, stop_ids: Sequence[int], floor: float = LOG_REWARD_FLOOR):
        super().__init__(target, stop_ids, floor)
        self.tau = float(target.potential.tau)

    def compute(self, lm, ppass, trajs, states, cum):
        return (cum + self.stop_term(lm, ppass, trajs, states)) / self.tau


class PotentialReward(PrefixReward):
    name = "potential"

    def __init__(self, target: Target, stop_ids: Sequence[int], floor: float = LOG_REWARD_FLOOR):
        super().__init__(target, stop_ids, floor)
        self.prefix_defined = bool(getattr(target.potential, "prefix_defined", False))

    def compute(self, lm, ppass, trajs, states, cum):
        out = cum + self.stop_term(lm, ppass, trajs, states)
        phi = torch.full_like(out, float("-inf"))
        rows, slots, seqs = [], [], []
        for i, st in enumerate(states):
            chosen = range(len(st)) if self.prefix_defined else [len(st) - 1]
            for a in chosen:
                rows.append(i)
                slots.append(a)
                seqs.append(trajs.tokens[i][: st[a]])
        prompt_index = [trajs.prompt_index[i] for i in rows]
        values = self.target.log_phi(seqs, prompt_index).double()
        phi[torch.tensor(rows), torch.tensor(slots)] = values
        return out + phi


REWARDS: dict[type, type[PrefixReward]] = {
    JudgedObservationPotential: JudgedLikelihoodReward,
    InfillingPotential: LikelihoodReward,
    TemperedPotential: TemperedReward,
}
"""Potential class → reward, the first that ``isinstance`` matches (subclasses first); anything else is a
:class:`PotentialReward`."""


def reward_for(target: Target, stop_ids: Sequence[int], floor: float = LOG_REWARD_FLOOR) -> PrefixReward:
    """The GFlowNet reward of ``target`` (module docstring) with stop action ``stop_ids``."""
    for cls, reward in REWARDS.items():
        if isinstance(target.potential, cls):
            return reward(target, stop_ids, floor)
    return PotentialReward(target, stop_ids, floor)
