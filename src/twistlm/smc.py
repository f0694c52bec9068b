"""Sequential Monte Carlo over tokens: SIS, SMC with the base proposal, twisted SMC (MATH.md throughout).

One loop serves every sampler. At step t each unfinished particle k proposes s_t ~ q_t(· | s_<t) and multiplies its
weight by

    w_t = p0(s_t | s_<t) ψ̃_t(s_1:t) / ( ψ_t−1(s_1:t−1) q_t(s_t | s_<t) ),   ψ̃_t = φ if s_1:t is finished else ψ_t,

with ψ ≡ 1 when no twist is given. For the twist-induced proposal q_t ∝ p0 ψ_t this reduces to
w_t = Z_t(s_<t) / ψ_t−1 (times φ / ψ_t(s_1:t) on the finishing step), computed with an exact logsumexp over the
vocabulary. Groups (one per prompt) whose ESS falls below κ·K add log mean_k e^{W_k} to log Ẑ, resample, and reset
W = 0; at the end log Ẑ adds log mean_k e^{W_k}. κ = 0 is SIS, κ = 1 resamples every step.

With ``reference`` (conditional SMC, MATH.md "Bounds"), particle 0 of each group is clamped to a given sequence: its
tokens and ancestry are fixed, the other K−1 particles choose ancestors among all K by multinomial draws, and
E[log Ẑ] ≥ log Z when the reference is an exact sample of σ.

With ``target.tool`` (see :mod:`twistlm.tools`), tokens a tool returns are forced one per step: p0 = q = 1 for them.

Tempered proposal (``proposal="tempered"``, temperature τ > 0): q_t(v) ∝ (p0(v | s_<t) ψ_t(s_<t, v))^{1/τ}, ψ ≡ 1
without a twist, normalised by an exact logsumexp over the vocabulary. The weights stay exact: the general w_t above
with log q_t(s_t) = (log p0 + log ψ_t)(s_t) / τ − log Σ_v (p0 ψ_t)(v)^{1/τ}, so Ẑ is unbiased for Z at every τ
(τ = 1 is the base proposal, or the twist-induced one with a twist). ``proposal="greedy"`` takes argmax_v p0 ψ_t at
every step (the τ → 0 limit; ties go to the lowest token id; no random draw) and treats q as the point mass on it
(log q = 0). Its weights are therefore not importance weights: W = log p0(s) φ(s) of the decoded sequence, and
log Ẑ = log p0(s) φ(s) ≤ log Z is not an estimate of log Z.

Policy proposal (``proposal="policy"``, ``policy=`` a second :class:`~twistlm.lm.ParticleLM` over the same vocabulary,
e.g. a GFlowNet policy's ``.lm``): q_t is the policy's next-token distribution, optionally restricted to its
``policy_space`` (an :class:`~twistlm.gfn.sampling.ActionSpace`); the policy keeps its own KV cache, prefilled, stepped
and reordered with the sampler's particles (:mod:`twistlm.policy_proposal`). Its weights are the general w_t above with
the policy's exact log q_t(s_t); with a twist, ψ gives the intermediate targets p0 ψ_t while the policy still proposes.
Ẑ is unbiased whenever q_t > 0 wherever σ has mass: always without an action space, and with one only when σ's
support lies inside it (see :mod:`twistlm.policy_proposal` for min_len and the stop rules).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import torch

from twistlm.errors import ConfigError, TwistLMError
from twistlm.memory import BASE_VOCAB_BUFFERS, PROPOSAL_VOCAB_BUFFERS, check_sampler_memory, policy_bytes
from twistlm.policy_proposal import PolicyProposal, policy_lm, policy_prompt_ids
from twistlm.resampling import categorical, get_resampler, log_mean_exp, multinomial
from twistlm.resampling import ess as compute_ess
from twistlm.result import SMCResult
from twistlm.target import Target
from twistlm.tools import ToolQueue
from twistlm.twists.base import Twist, TwistContext

PROPOSALS = ("base", "twisted", "tempered", "policy")
"""Proposals with exact importance weights (Ẑ unbiased for Z): what bounds, KL estimates and ``twistlm sample`` use."""
DECODERS = ("greedy",)
"""Deterministic decoding through the same loop (``twistlm solve``); its weights are p0·φ of the path, not
importance weights."""
StepCallback = Callable[[int, int, dict], None]
"""Called after every step as ``callback(t, T, info)``; ``info`` has ``ess`` (mean over groups) and ``finished``
(share finished), and the step's live tensors in particle order before any resampling at t (references, not copies:
copy what you keep, as :class:`twistlm.trace.SMCTrace` does): ``tokens`` (N,) the chosen tokens (EOS padding where
inactive), ``active`` (N,) unfinished before t, ``forced`` (N,) tool-forced or None, ``log_psi`` (N,) log ψ_t of the
chosen tokens or None without a twist, ``log_weights`` (B, K) W after step t, ``hidden`` (N, H) the LM's last hidden
state h_t(s_<t) that chose them (what twist heads read; :mod:`twistlm.corpus` caches it). N = B·K, row b·K + k."""
MAX_SEED = 2**64 - 1
FLOAT32_SAFE_LOG = 1e4
"""Above this |log Z_t| the float32 normaliser of the twisted proposal loses precision: it is redone in float64."""


class _Reference:
    """Clamped trajectories for conditional SMC: one token sequence per prompt, placed in particle 0."""

    def __init__(self, target: Target, reference: Sequence[Sequence[int]], num_particles: int, pad: int):
        if len(reference) != target.num_prompts:
            raise ConfigError(f"reference needs one sequence per prompt ({target.num_prompts}), got {len(reference)}")
        T = target.max_new_tokens
        stops = set(target.stop_ids)
        self.tokens = torch.full((len(reference), T), pad, dtype=torch.long)
        for b, seq in enumerate(reference):
            seq = list(seq)
            finishes = len(seq) == T or (0 < len(seq) < T and seq[-1] in stops)
            if not finishes or any(tok in stops for tok in seq[:-1]):
                raise ConfigError(f"reference {b} is not a finished sequence of this target: {seq}")
            self.tokens[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        self.rows = torch.arange(len(reference)) * num_particles


def _check_inputs(
    target: Target,
    num_particles: int,
    proposal: str,
    twist: Twist | None,
    ess_threshold: float,
    temperature: float = 1.0,
    policy: Any = None,
    policy_space: Any = None,
):
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ConfigError(f"num_particles must be a positive integer, got {num_particles!r}")
    if proposal not in PROPOSALS + DECODERS:
        raise ConfigError(f"unknown proposal {proposal!r}; choose from: {', '.join(PROPOSALS + DECODERS)}")
    if proposal == "twisted" and twist is None:
        raise ConfigError("the twisted proposal needs a twist (twist=...)")
    if proposal == "policy" and policy is None:
        raise ConfigError("the policy proposal needs a policy (policy=...)")
    if policy is not None and proposal != "policy":
        raise ConfigError(f"a policy needs proposal='policy' (got proposal={proposal!r})")
    if policy_space is not None and policy is None:
        raise ConfigError("policy_space restricts a policy proposal: give policy=... too")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature != 1.0 and proposal != "tempered":
        raise ConfigError(f"temperature {temperature:g} needs proposal='tempered' (got proposal={proposal!r})")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ConfigError(f"ess_threshold κ must lie in [0, 1], got {ess_threshold}")


@torch.inference_mode()
def run_smc(
    target: Target,
    num_particles: int = 64,
    *,
    proposal: str = "base",
    twist: Twist | None = None,
    temperature: float = 1.0,
    resampler: str = "systematic",
    ess_threshold: float = 1.0,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    reference: Sequence[Sequence[int]] | None = None,
    callback: StepCallback | None = None,
    policy: Any = None,
    policy_space: Any = None,
) -> list[SMCResult]:
    """Run B = target.num_prompts independent groups of K particles; one :class:`SMCResult` per prompt.

    ``seed``: an integer in [0, 2^64 − 1] makes the run reproducible; ``None`` draws fresh entropy
    (``secrets.randbits(63)``), so two runs differ. Ignored when a ``generator`` is given.
    ``policy`` (``proposal="policy"``): a :class:`~twistlm.lm.ParticleLM` over the target's vocabulary, or an object
    with one as ``.lm`` (a GFlowNet ``LoRAPolicy`` on its own copy of the base model, a ``TabularPolicy``);
    ``policy_space``: an optional :class:`~twistlm.gfn.sampling.ActionSpace` restricting it (module docstring).
    """
    _check_inputs(target, num_particles, proposal, twist, ess_threshold, temperature, policy, policy_space)
    q_lm = policy_lm(policy, target.lm) if policy is not None else None
    _check_memory(target, num_particles, proposal, q_lm)
    resample = get_resampler(resampler)
    lm, K, B, T = target.lm, num_particles, target.num_prompts, target.max_new_tokens
    if generator is None:
        seed = secrets.randbits(63) if seed is None else check_seed(seed)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    token_gen = _device_generator(gen, lm.device)
    N, pad = B * K, lm.eos_token_id
    ref = _Reference(target, reference, K, pad) if reference is not None else None
    tools = ToolQueue(target.tool, lm, N) if target.tool is not None else None
    is_stop = torch.zeros(lm.vocab_size, dtype=torch.bool)
    is_stop[target.stop_ids] = True
    f64 = torch.float64

    state = lm.prefill(target.prompt_ids, K)
    if twist is not None and hasattr(twist, "start"):  # plain nn.Module twists without the hooks are accepted too
        twist.start(target, K)
    q_policy = None
    if q_lm is not None:
        q_policy = PolicyProposal(q_lm, policy_prompt_ids(policy, target), K, policy_space)
    prompt_index = torch.arange(B).repeat_interleave(K)
    tokens = torch.full((N, T), pad, dtype=torch.long)
    finished = torch.zeros(N, dtype=torch.bool)
    by_stop = torch.zeros(N, dtype=torch.bool)
    log_w = torch.zeros(B, K, dtype=f64)
    log_z = torch.zeros(B, dtype=f64)
    prev_log_psi = torch.zeros(N, dtype=f64)  # log ψ_t−1(s_1:t−1); ψ_0 ≡ 1
    log_phi = torch.full((N,), float("nan"), dtype=f64)
    log_p0 = torch.zeros(N, dtype=f64)  # log p0(s_1:t | x) of the sampled tokens, handed to potentials
    ess_trace: list[torch.Tensor] = []
    events: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(B)]
    # With one particle resampling is the identity (and log Ẑ the same either way): skip it.
    every_step, never = ess_threshold >= 1.0, ess_threshold <= 0.0 or K == 1

    for t in range(1, T + 1):
        active = ~finished
        logp0 = state.logprobs
        active_dev = active.to(logp0.device)
        log_psi = None
        if twist is not None:
            ctx = TwistContext(state.hidden, tokens[:, : t - 1], t, T, prompt_index, logp0)
            raw_psi = twist.log_psi(ctx)
            log_psi = raw_psi.to(device=logp0.device, dtype=logp0.dtype)
        if proposal == "twisted":
            logits_q = logp0 + log_psi
            if not bool(active.all()):  # finished rows: any valid distribution (their draw is discarded)
                logits_q[~active_dev] = logp0[~active_dev]
            log_zt = torch.logsumexp(logits_q, dim=-1)
            if not bool((log_zt.abs() < FLOAT32_SAFE_LOG)[active_dev].all()):  # rare: ψ = 0, NaN/inf or huge ψ
                logits_q, log_zt = _twisted_logits_f64(logp0, raw_psi, active_dev, twist, t)
            probs = logits_q.sub_(log_zt[:, None]).exp_()  # in place: one (N, V) buffer fewer at large K
        elif proposal == "tempered":  # q_t ∝ (p0 ψ_t)^{1/τ}
            logits_q = (logp0 if log_psi is None else logp0 + log_psi) / temperature
            if not bool(active.all()):
                logits_q[~active_dev] = logp0[~active_dev]
            log_zt = torch.logsumexp(logits_q, dim=-1)
            if torch.isneginf(log_zt[active_dev]).any():
                raise TwistLMError(f"the twist gives ψ = 0 to every token at step {t}: the proposal is undefined")
            probs = logits_q.sub_(log_zt[:, None]).exp_()
        elif proposal == "policy":  # q_t = the policy's next-token distribution (its own KV cache)
            log_q_all = q_policy.log_q(active, t)
            probs = log_q_all.to(logp0.device).exp()
        elif proposal == "greedy":
            probs = None
        else:
            probs = torch.exp(logp0)
        # Token draws happen where the model lives; the bookkeeping (weights, tokens, ancestry) stays on the CPU.
        if probs is not None:
            s = categorical(probs, token_gen).cpu()
        else:
            s = (logp0 if log_psi is None else logp0 + log_psi).argmax(dim=-1).cpu()
        if ref is not None:
            s[ref.rows] = ref.tokens[:, t - 1]
        forced = tools.force(s, active) if tools is not None else None
        if forced is not None and ref is not None:
            live = active[ref.rows]
            if not torch.equal(s[ref.rows][live], ref.tokens[:, t - 1][live]):
                raise ConfigError(f"a reference disagrees with the tool's output at step {t}: it was not sampled "
                                  "under this target's tool")
        s = torch.where(active, s, torch.full_like(s, pad))
        tokens[:, t - 1] = s

        lp0 = logp0.gather(1, s[:, None].to(logp0.device)).squeeze(1).to(device="cpu", dtype=f64)
        sampled = active if forced is None else active & ~forced
        log_p0 += torch.where(sampled, lp0, torch.zeros_like(lp0))
        if q_policy is not None:
            q_policy.advance(s, sampled, forced)
        stop_now = active & is_stop[s]
        finishing = stop_now | (active if t == T else torch.zeros_like(active))
        if log_psi is not None:
            lpsi = raw_psi.gather(1, s[:, None].to(raw_psi.device)).squeeze(1).to(device="cpu", dtype=f64)
            _check_twist_values(lpsi, active, twist, t)
        else:
            lpsi = torch.zeros(N, dtype=f64)
        cur = lpsi.clone()
        rows = finishing.nonzero().squeeze(1)
        if rows.numel() > 0:
            phi = target.log_phi(
                tokens[rows, :t].tolist(), prompt_index[rows].tolist(), log_p0=log_p0[rows], lm_state=state, state_rows=rows
            )
            cur[rows] = phi
            log_phi[rows] = phi
        if proposal == "twisted":
            inc = log_zt.to(device="cpu", dtype=f64) - prev_log_psi + torch.where(finishing, cur - lpsi, torch.zeros_like(cur))
        elif proposal == "tempered":  # log p0(s_t) − log q_t(s_t), q_t exactly normalised
            log_q = (lp0 + lpsi) / temperature - log_zt.to(device="cpu", dtype=f64)
            inc = lp0 - log_q + cur - prev_log_psi
        elif proposal == "policy":  # log p0(s_t) − log q_t(s_t), the policy's q_t exactly normalised
            inc = lp0 - q_policy.sampled_log_q(log_q_all, s, sampled, t) + cur - prev_log_psi
        elif proposal == "greedy":  # q = point mass (log q = 0): not an importance weight
            inc = lp0 + cur - prev_log_psi
        else:
            inc = cur - prev_log_psi  # p0 / q cancels
        if forced is not None:  # tool tokens: p0 = q = 1, only the twist ratio (or φ) remains
            inc = torch.where(forced, cur - prev_log_psi, inc)
        inc = torch.where(active, inc, torch.zeros_like(inc))
        # A particle at weight zero stays at zero (avoid −inf − (−inf) = NaN when its twist was already 0).
        inc = torch.where(torch.isneginf(prev_log_psi) & active, torch.full_like(inc, float("-inf")), inc)
        log_w += inc.view(B, K)
        prev_log_psi = torch.where(active, cur, prev_log_psi)
        finished |= finishing
        by_stop |= stop_now
        if tools is not None:
            tools.consult(target, tokens, t, s, ~finished & ~forced)

        group_ess = compute_ess(log_w)
        ess_trace.append(group_ess)
        done = bool(finished.all()) or t == T
        if callback is not None:
            callback(t, T, {"ess": float(group_ess.mean()), "finished": float(finished.float().mean()), "tokens": s,
                            "active": active, "forced": forced, "log_psi": lpsi if log_psi is not None else None,
                            "log_weights": log_w, "hidden": state.hidden})
        if done:
            break
        resample_groups = torch.ones(B, dtype=torch.bool) if every_step else group_ess < ess_threshold * K
        # A group whose particles all have weight zero has Ẑ = 0 already; it cannot be resampled and stays dead.
        resample_groups &= ~torch.isneginf(log_w).all(dim=1)
        if never or not resample_groups.any():
            state = lm.step(state, s)
            continue
        groups = resample_groups.nonzero().squeeze(1)
        log_z[groups] += log_mean_exp(log_w[groups])
        if ref is None:
            local = resample(log_w[groups], K, gen)
        else:
            free = multinomial(log_w[groups], K - 1, gen)
            local = torch.cat([torch.zeros(len(groups), 1, dtype=torch.long), free], dim=1)
        index = torch.arange(N).view(B, K)
        index[groups] = local + groups[:, None] * K
        index = index.view(-1)
        for g, anc in zip(groups.tolist(), local):
            events[g].append((t, anc.clone()))
        log_w[groups] = 0.0
        if not torch.equal(index, torch.arange(N)):
            tokens, finished, by_stop = tokens[index], finished[index], by_stop[index]
            prev_log_psi, log_phi, log_p0, s = prev_log_psi[index], log_phi[index], log_p0[index], s[index]
            state = lm.reorder(state, index)
            if tools is not None:
                tools.reorder(index)
            if twist is not None and hasattr(twist, "reorder"):
                twist.reorder(index)
            if q_policy is not None:
                q_policy.reorder(index)
        state = lm.step(state, s)

    log_z += log_mean_exp(log_w)
    return _results(target, tokens, log_w, log_z, log_phi, by_stop, ess_trace, events)


def check_seed(seed: int) -> int:
    """A seed torch accepts: an integer in [0, 2^64 − 1] (bools refused)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, 2^64 − 1], got {seed!r}")
    return seed


def _check_memory(target: Target, num_particles: int, proposal: str, policy=None) -> None:
    """Refuse a run whose (N, V) buffers and KV cache (the policy's too) cannot fit (see :mod:`twistlm.memory`)."""
    buffers = BASE_VOCAB_BUFFERS + (PROPOSAL_VOCAB_BUFFERS if proposal != "base" else 0)
    seq_len = max(len(ids) for ids in target.prompt_ids) + target.max_new_tokens
    rows = target.num_prompts * num_particles
    extra = policy_bytes(policy, rows, seq_len) if policy is not None else 0
    check_sampler_memory(target.lm, rows, seq_len, target.max_new_tokens, buffers, extra_device_bytes=extra)


def _twist_label(twist) -> str:
    name = getattr(twist, "name", None)
    return type(twist).__name__ + (f" {name!r}" if isinstance(name, str) else "")


def _check_twist_values(log_psi: torch.Tensor, active: torch.Tensor, twist, t: int) -> None:
    """NaN or +inf log ψ on an unfinished particle is an error naming the twist (−inf, i.e. ψ = 0, is allowed)."""
    bad = torch.isnan(log_psi) | torch.isposinf(log_psi)
    bad = (bad.any(dim=-1) if bad.dim() > 1 else bad) & active.to(bad.device)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise TwistLMError(
            f"twist {_twist_label(twist)} returned NaN or +inf log ψ at step {t} (particle {row}): log ψ must be "
            "finite or −inf (retrain it, e.g. with a smaller learning rate)"
        )


def _twisted_logits_f64(logp0, log_psi, active, twist, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The twisted proposal's logits log p0 + log ψ and their logsumexp in float64, the twist's values checked
    first (slow path for ψ = 0 rows, non-finite or huge log ψ)."""
    _check_twist_values(log_psi, active, twist, t)
    logp0 = logp0.to(torch.float64)
    logits = logp0 + log_psi.to(device=logp0.device, dtype=torch.float64)
    logits[~active] = logp0[~active]
    log_zt = torch.logsumexp(logits, dim=-1)
    if torch.isneginf(log_zt[active]).any():
        raise TwistLMError(f"the twist gives ψ = 0 to every token at step {t}: the proposal is undefined")
    if not bool(torch.isfinite(log_zt[active]).all()):
        raise TwistLMError(f"twist {_twist_label(twist)}: the proposal's normaliser is not finite at step {t}")
    return logits, log_zt


def _device_generator(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on the model's device, seeded from ``gen`` (the same generator when that is already there)."""
    if torch.device(gen.device).type == torch.device(device).type:
        return gen
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


def _results(target, tokens, log_w, log_z, log_phi, by_stop, ess_trace, events) -> list[SMCResult]:
    B, K = log_w.shape
    ess_matrix = torch.stack(ess_trace, dim=1) if ess_trace else torch.zeros(B, 0)
    out = []
    for b in range(B):
        rows = range(b * K, (b + 1) * K)
        ids = [_trim(tokens[r].tolist(), target.stop_ids, bool(by_stop[r])) for r in rows]
        out.append(
            SMCResult(
                prompt=target.prompt_texts[b],
                texts=[target.lm.decode(target.completion_ids(i)) for i in ids],
                token_ids=ids,
                log_weights=log_w[b].clone(),
                log_z=float(log_z[b]),
                log_phi=log_phi[b * K : (b + 1) * K].clone(),
                ess=ess_matrix[b].tolist(),
                resampled_at=[t for t, _ in events[b]],
                ancestors=[a for _, a in events[b]],
                finished_by_eos=by_stop[b * K : (b + 1) * K].tolist(),
            )
        )
    return out


def _trim(row: list[int], stop_ids: Sequence[int], stopped: bool) -> list[int]:
    """Generated tokens up to and including the finishing stop token (padding after it dropped)."""
    if not stopped:
        return row
    stops = set(stop_ids)
    for i, tok in enumerate(row):
        if tok in stops:
            return row[: i + 1]
    return row


def smc(target: Target, num_particles: int = 64, **kwargs) -> SMCResult | list[SMCResult]:
    """SMC (default: base proposal p0, systematic resampling every step). One result, or a list for several prompts.

    Keyword arguments: ``proposal`` ("base" | "twisted" | "tempered" | "policy" | "greedy"), ``twist``,
    ``temperature`` τ (tempered proposal only), ``policy`` and ``policy_space`` (policy proposal only), ``resampler``,
    ``ess_threshold`` κ ∈ [0, 1], ``seed`` or ``generator``, ``reference`` (conditional SMC), ``callback``; see
    :func:`run_smc`.
    """
    results = run_smc(target, num_particles, **kwargs)
    return results[0] if target.num_prompts == 1 else results


def sis(target: Target, num_particles: int = 64, **kwargs) -> SMCResult | list[SMCResult]:
    """Importance sampling: SMC that never resamples (κ = 0); log Ẑ = log mean_k Π_t w_t^k."""
    return smc(target, num_particles, ess_threshold=0.0, **kwargs)


def twisted_smc(target: Target, twist: Twist, num_particles: int = 64, **kwargs) -> SMCResult | list[SMCResult]:
    """SMC with the twist-induced proposal q_t ∝ p0 ψ_t and intermediate targets π_t ∝ p0 ψ_t."""
    return smc(target, num_particles, proposal="twisted", twist=twist, **kwargs)
