"""GFlowNet objectives, a registry of small functions over a :class:`~twistlm.gfn.trajectories.StateBatch`.

Notation (MATH.md, "Amortized inference"): states s_0 … s_A of a trajectory, log q the policy's (untempered)
log-probabilities, log R(s_i ⊤) the reward of stopping at s_i, divided by the reward temperature.

* ``subtb`` — modified sub-trajectory balance. With the flow F(s_i) = R(s_i ⊤) / q(⊤ | s_i) (no learned flow), every
  pair of terminable states i < j gives the residual

      r_ij = log R(s_i ⊤) − log q(⊤ | s_i) + Σ_{k=i}^{j−1} log q(s_{k+1} | s_k) − log R(s_j ⊤) + log q(⊤ | s_j),

  and L = Σ_{i<j} λ^{j−i} r_ij² / Σ_{i<j} λ^{j−i} per trajectory (mean over trajectories). Only pairs of *terminable*
  states enter (below ``min_len`` the stop is not an action, so F is not defined there), and no pair ends with the
  stop transition itself (its residual is identically 0 and would only dilute the normaliser). At the optimum
  q(z ⊤) ∝ R(z ⊤) for every z.

  When the empty prefix s_0 is not terminable (``min_len`` > 0, or the stop only after a tool's output), no pair
  spans two trajectories, so the pairs alone leave free how the policy splits its mass among first actions (on the
  toy target the loss then stalls at KL ≈ 0.1). The missing link is log F(s_0) = log Z(x): we add, per prompt, the
  variance over its trajectories of d = log R(z ⊤) − log q(z ⊤) (= log Z(x) for every z at the optimum; the
  "VarGrad" form, which needs no learned Z and is valid off-policy). MATH.md's form is the case s_0 terminable,
  where this term vanishes at the same optimum and is left out.
* ``tb`` — trajectory balance with a learned log Z(x) per prompt: (log Z(x) + log q(z ⊤) − log R(z ⊤))².
* ``vargrad`` — trajectory balance with log Z(x) estimated, not learned: the variance over each prompt's
  trajectories in the batch of d = log R(z ⊤) − log q(z ⊤) (the log-variance loss, Richter et al. 2020; zero iff d
  is the same for every z of a prompt, i.e. q(z ⊤) ∝ R(z ⊤)). It needs no log Z table, so it suits a policy
  amortized over many prompts or observations each seen a few times (TB's per-prompt log Z would lag behind), and
  it is valid off-policy. Needs ≥ 2 trajectories per prompt (``samples_per_prompt``), and distinct ones: a batch of
  identical trajectories has zero variance and gives no gradient (TB's log Z still moves them), so it suits long
  texts over a large vocabulary, not a peaked policy over a few sequences.
* ``sft`` — maximum likelihood of given trajectories: −log q(z ⊤) (the supervised baseline on labelled rationales).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from twistlm.errors import ConfigError
from twistlm.gfn.trajectories import StateBatch


@dataclass(frozen=True)
class Objective:
    name: str
    compute: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    needs_prefix_rewards: bool
    needs_log_z: bool = False
    uses_rewards: bool = True


def subtb_loss(batch: StateBatch, *, lam: float = 1.0, **_) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Modified SubTB (module docstring); (loss, terms)."""
    flow = batch.log_reward - batch.stop_lp  # log F(s_i), (n, S)
    cum = torch.cat([torch.zeros_like(batch.action_lp[:, :1]), batch.action_lp.cumsum(dim=1)], dim=1)[:, :-1]
    # r_ij = F_i − F_j + cum_j − cum_i
    res = (flow[:, :, None] - flow[:, None, :]) - cum[:, :, None] + cum[:, None, :]
    S = flow.shape[1]
    i = torch.arange(S)
    upper = i[:, None] < i[None, :]
    valid = upper[None] & batch.terminable[:, :, None] & batch.terminable[:, None, :]
    weight = torch.where(valid, lam ** (i[None, :] - i[:, None]).to(res.dtype)[None], torch.zeros_like(res))
    norm = weight.sum(dim=(1, 2))
    per_traj = (weight * res.pow(2)).sum(dim=(1, 2)) / norm.clamp(min=1e-30)
    has_pairs = norm > 0
    root_free = ~batch.terminable[:, 0]
    if not bool(has_pairs.any()) and not bool(root_free.any()):
        raise ConfigError("no trajectory has two terminable states: SubTB needs max_len > min_len")
    loss = per_traj[has_pairs].mean() if bool(has_pairs.any()) else per_traj.sum() * 0
    terms = {"subtb": loss, "log_reward": batch.log_reward, "log_q": batch.action_lp}
    if bool(root_free.any()):
        link = _group_variance(batch.final_log_reward() - batch.trajectory_log_q(), batch.group, root_free)
        terms["root_link"] = link
        loss = loss + link
    return loss, terms


def _group_variance(d: torch.Tensor, group: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Mean over ``rows`` of (d − mean of d in its group)² (groups of one contribute 0)."""
    group = torch.zeros_like(d, dtype=torch.long) if group is None else group.to(d.device)
    rows = rows.to(d.device)
    num = int(group.max()) + 1
    count = torch.zeros(num, dtype=d.dtype, device=d.device).index_add_(0, group[rows], torch.ones_like(d[rows]))
    total = torch.zeros(num, dtype=d.dtype, device=d.device).index_add_(0, group[rows], d[rows])
    mean = total / count.clamp(min=1)
    return (d[rows] - mean[group[rows]]).pow(2).mean()


def tb_loss(batch: StateBatch, *, log_z: torch.Tensor, **_) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Trajectory balance with ``log_z`` (n,) the learned log Z of each trajectory's prompt."""
    res = log_z + batch.trajectory_log_q() - batch.final_log_reward()
    loss = res.pow(2).mean()
    return loss, {"tb": loss, "log_z": log_z, "log_reward": batch.final_log_reward()}


def vargrad_loss(batch: StateBatch, **_) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-prompt variance of log R(z ⊤) − log q(z ⊤) over the batch (module docstring)."""
    d = batch.final_log_reward() - batch.trajectory_log_q()
    loss = _group_variance(d, batch.group, torch.ones_like(d, dtype=torch.bool))
    return loss, {"vargrad": loss, "log_reward": batch.final_log_reward()}


def sft_loss(batch: StateBatch, **_) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood per trajectory (mean), stop included."""
    loss = -batch.trajectory_log_q().mean()
    return loss, {"sft": loss}


OBJECTIVES: dict[str, Objective] = {
    "subtb": Objective("subtb", subtb_loss, needs_prefix_rewards=True),
    "tb": Objective("tb", tb_loss, needs_prefix_rewards=False, needs_log_z=True),
    "vargrad": Objective("vargrad", vargrad_loss, needs_prefix_rewards=False),
    "sft": Objective("sft", sft_loss, needs_prefix_rewards=False, uses_rewards=False),
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose from: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
