"""A policy as the SMC proposal: q_t(v) = a second language model's next-token distribution (MATH.md, "Amortized
inference": a trained policy is a proposal).

The policy is any :class:`~twistlm.lm.ParticleLM` over the target's vocabulary and tokenizer: a GFlowNet LoRA
policy's ``.lm`` (:mod:`twistlm.gfn.policy`, loaded on its own copy of the base model), the toy
:class:`~twistlm.gfn.toy_policy.TabularPolicy`'s ``.lm``, or an object carrying one as ``.lm``. :class:`PolicyProposal`
keeps the policy's own state (its KV cache) over the sampler's N = B·K particles: it prefills the same prompts, is
stepped with the same tokens (sampled, tool-forced, and the EOS padding of finished particles) and reordered with the
same ancestor indices on resampling, so at step t its log-probabilities are log q_t(· | x, s_<t) of every particle's
own prefix. The sampler (:mod:`twistlm.smc`) then weighs each sampled token by

    log w_t = log p0(s_t) + log ψ̃_t − log ψ_t−1 − log q_t(s_t),

exact per token (q_t is normalised over the vocabulary), so Ẑ is unbiased for Z whenever q_t > 0 wherever σ has mass —
always true of a softmax over the full vocabulary.

What the policy reads (:func:`policy_prompt_ids`): the target's prompts, or — for a policy conditioned on the
observation (:mod:`twistlm.conditioning`; the policy or its LM carries a ``condition`` callable) — its own prompt
per target prompt, e.g. the ending o before the beginning x. Only q changes; p0 and φ read the target's prompts, so the
weights below stay exact.

Action space (optional; :class:`~twistlm.gfn.sampling.ActionSpace`, what the policy was trained within): q_t is
restricted and renormalised as in training (:meth:`ActionSpace.log_probs`): tokens outside ``allowed`` get q = 0, and so
do the stop tokens before ``min_len`` actions and, with ``stop_after_tool``, anywhere but right after a tool's output.
Actions are the sampled tokens; tool-forced ones do not count. ``max_len`` is not applied (the target's horizon T cuts
every particle). The weights stay exact for that q, but E[Ẑ] = Σ_{s : q(s) > 0} p0(s) φ(s): Ẑ is unbiased for Z only
when σ's support lies inside q's (e.g. φ = 0 on every sequence the space rules out, such as those stopping before
``min_len``); otherwise it estimates that smaller sum, and E[log Ẑ] is still a lower bound on log Z. A token with q = 0
can only come from outside (a conditional-SMC reference): it is refused, since the upper bound would be +∞.
"""

from __future__ import annotations

from typing import Any

import torch

from twistlm.errors import ConfigError, TwistLMError
from twistlm.lm import LMState, ParticleLM


def policy_lm(policy: Any, target_lm: ParticleLM) -> ParticleLM:
    """The ParticleLM of ``policy`` (itself, or its ``.lm``), checked to fit the target's LM.

    Refused: another vocabulary size, and a policy computing with the target's own model (a LoRA adapter is injected
    into the model it is loaded on, so the target would then compute q_θ instead of p0).
    """
    lm = policy if isinstance(policy, ParticleLM) else getattr(policy, "lm", None)
    if not isinstance(lm, ParticleLM):
        raise ConfigError(
            f"policy must be a ParticleLM or carry one as .lm (LoRAPolicy, TabularPolicy), got {type(policy).__name__}"
        )
    if lm.vocab_size != target_lm.vocab_size:
        raise ConfigError(
            f"the policy's vocabulary has {lm.vocab_size} tokens, the target's LM {target_lm.vocab_size}: a policy "
            "must share the base model's tokenizer"
        )
    model = getattr(lm, "model", None)
    if lm is target_lm or (model is not None and model is getattr(target_lm, "model", None)):
        raise ConfigError(
            "the policy computes with the target's own model (gfn.load_policy injects the adapter into the model it "
            "is given, which would then compute q_θ, not p0): load the policy on its own copy of the base model, "
            "e.g. gfn.load_policy(twistlm.load_lm(...), DIR)"
        )
    return lm


def policy_prompt_ids(policy: Any, target: Any) -> list[list[int]]:
    """The prompt ids the policy reads for each of the target's prompts: ``condition(target)`` when the policy (or its
    ``.lm``) carries a ``condition`` callable, else the target's own prompt ids."""
    condition = getattr(policy, "condition", None) or getattr(getattr(policy, "lm", None), "condition", None)
    if condition is None:
        return [list(ids) for ids in target.prompt_ids]
    prompts = condition(target)
    if len(prompts) != target.num_prompts:
        raise ConfigError(f"the policy's condition gave {len(prompts)} prompts for a target with {target.num_prompts}")
    return prompts


class PolicyProposal:
    """The policy's state over one sampler run of N = B·K particles, one step behind the sampler's tokens (see the
    module docstring). ``space``: an optional action space restricting q_t (duck-typed: ``log_probs``)."""

    def __init__(self, lm: ParticleLM, prompt_ids, num_particles: int, space: Any = None):
        self.lm, self.space = lm, space
        self.state: LMState = lm.prefill(prompt_ids, num_particles)
        rows = len(prompt_ids) * num_particles
        self.pending: torch.Tensor | None = None  # tokens of the last step, fed lazily (after any resampling)
        self.actions = torch.zeros(rows, dtype=torch.long)  # sampled (non-forced) tokens so far
        self.after_tool = torch.zeros(rows, dtype=torch.bool)  # the last token was tool-forced

    def log_q(self, active: torch.Tensor, t: int) -> torch.Tensor:
        """(N, V) log q_t(· | x, s_<t) for every particle; rows of finished particles are any valid distribution."""
        if self.pending is not None:
            self.state = self.lm.step(self.state, self.pending)
            self.pending = None
        raw = self.state.logprobs
        logq = raw if self.space is None else self.space.log_probs(raw, self.actions, self.after_tool)
        active = active.to(logq.device)
        if self.space is not None:
            empty = ~torch.isfinite(logq).any(dim=-1)  # a row allowing no token: log_softmax gives NaN
            if bool((empty & active).any()):
                row = int((empty & active).nonzero()[0])
                raise TwistLMError(f"the policy's action space allows no token at step {t} (particle {row})")
            if bool(empty.any()):
                logq[empty] = raw[empty]
        if bool(torch.isnan(logq[active]).any()):
            raise TwistLMError(f"the policy's log-probabilities are NaN at step {t} (diverged weights?)")
        return logq

    def sampled_log_q(self, logq: torch.Tensor, tokens: torch.Tensor, sampled: torch.Tensor, t: int) -> torch.Tensor:
        """(N,) float64 on the CPU: log q_t(s_t) of each particle's token; q = 0 on a sampled token is an error."""
        lq = logq.gather(1, tokens[:, None].to(logq.device)).squeeze(1).to(device="cpu", dtype=torch.float64)
        zero = sampled & torch.isneginf(lq)
        if bool(zero.any()):
            row = int(zero.nonzero()[0])
            where = "the policy's action space" if self.space is not None else "the policy (a −∞ logit)"
            raise TwistLMError(
                f"token {int(tokens[row])} of particle {row} at step {t} has q = 0 under {where}: a conditional-SMC "
                "reference outside q's support, while the weights need q > 0 wherever σ > 0"
                + ("; sample without the action space" if self.space is not None else "")
            )
        return lq

    def advance(self, tokens: torch.Tensor, sampled: torch.Tensor, forced: torch.Tensor | None) -> None:
        """Record step t's final tokens (fed to the policy at the next :meth:`log_q`) and count its actions."""
        self.pending = tokens.clone()
        self.actions += sampled.long()
        self.after_tool = forced.clone() if forced is not None else torch.zeros_like(sampled)

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row ``index[i]`` (resampling), pending tokens and action counts included."""
        self.state = self.lm.reorder(self.state, index)
        if self.pending is not None:
            self.pending = self.pending[index]
        self.actions, self.after_tool = self.actions[index], self.after_tool[index]
