"""Exact target samples by rejection (MATH.md, "Exact target samples"), for bounded potentials 0 ≤ φ ≤ 1.

Draw s ~ p0 and accept it with probability φ(s): accepted samples are exact draws from σ ∝ p0 φ, and
P(accept) = Σ_s p0(s) φ(s) = Z. Proposals come in batches from :func:`twistlm.run_smc` with the base proposal and
κ = 0 (each particle an independent p0 sample; ``result.log_phi`` holds log φ); acceptance uses U ~ Uniform(0, 1) from
an explicit seeded ``torch.Generator`` (accept iff log U < log φ(s)).

Evidence estimate. Proposals are taken in order and sampling stops at the N-th acceptance (within a batch, proposals
after it are discarded unseen), so the number of proposals P is negative-binomial and Ẑ = (N − 1)/(P − 1) is exactly
unbiased for Z (N ≥ 2); ``acceptance_rate`` = N/P is the maximum-likelihood value. When the budget ``max_proposals``
ends the search first (``allow_partial=True``), P is fixed and Ẑ = A/P is the unbiased binomial estimate. The 95%
interval is the Wilson score interval for A acceptances in P trials (approximate under the stopping rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from twistlm.bounds import select_prompts
from twistlm.errors import ConfigError, TwistLMError
from twistlm.smc import run_smc
from twistlm.solve import wilson_interval as proportion_interval
from twistlm.target import Target

if TYPE_CHECKING:
    from twistlm.corpus import SampleCorpus

def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """95% Wilson score interval of ``successes`` out of ``trials`` (defined for 0 or all successes too)."""
    return proportion_interval(successes / trials, trials) if trials > 0 else (0.0, 1.0)


@dataclass
class RejectionResult:
    """Accepted exact σ samples for one prompt and what it took to get them.

    token_ids: generated ids of each accepted sample (incl. a finishing stop token; usable as a cSMC reference).
    texts: their completions (EOS dropped).
    num_proposed: p0 samples looked at (P); num_accepted: A.
    acceptance_rate: A / P. z_hat: the unbiased estimate of Z (see the module docstring). z_ci: 95% Wilson interval.
    complete: whether all requested samples were obtained.
    """

    prompt: str
    token_ids: list[list[int]]
    texts: list[str]
    num_proposed: int
    num_accepted: int
    num_requested: int
    acceptance_rate: float
    z_hat: float
    z_ci: tuple[float, float]
    complete: bool
    log_phi: list[float] = field(default_factory=list, repr=False)

    @property
    def log_z_hat(self) -> float:
        return math.log(self.z_hat) if self.z_hat > 0 else -math.inf

    @property
    def log_z_ci(self) -> tuple[float, float]:
        return tuple(math.log(v) if v > 0 else -math.inf for v in self.z_ci)

    def to_dict(self) -> dict:
        return {
            "method": "rejection",
            "prompt": self.prompt,
            "num_requested": self.num_requested,
            "num_accepted": self.num_accepted,
            "num_proposed": self.num_proposed,
            "acceptance_rate": self.acceptance_rate,
            "z_hat": self.z_hat,
            "z_ci95": list(self.z_ci),
            "log_z_hat": self.log_z_hat,
            "log_z_ci95": list(self.log_z_ci),
            "complete": self.complete,
        }


def rejection_sample(
    target: Target,
    num_samples: int,
    *,
    prompt: int = 0,
    batch_size: int = 1024,
    max_proposals: int = 1_000_000,
    allow_partial: bool = False,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> RejectionResult:
    """``num_samples`` exact samples of σ for prompt number ``prompt`` of ``target`` (needs a bounded potential).

    Raises :class:`ConfigError` if the potential does not declare 0 ≤ φ ≤ 1, and :class:`TwistLMError` if fewer than
    ``num_samples`` samples are accepted within ``max_proposals`` proposals, unless ``allow_partial`` (then the
    result has ``complete=False`` and holds what was accepted).
    """
    _check_request(target, num_samples)
    if batch_size < 1 or max_proposals < 1:
        raise ConfigError("batch_size and max_proposals must be positive")
    if not 0 <= prompt < target.num_prompts:
        raise ConfigError(f"prompt index {prompt} out of range for {target.num_prompts} prompts")
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    single = target if target.num_prompts == 1 else select_prompts(target, [prompt])

    accepted: list[list[int]] = []
    accepted_phi: list[float] = []
    proposed = 0
    while len(accepted) < num_samples and proposed < max_proposals:
        k = min(batch_size, max_proposals - proposed)
        (res,) = run_smc(single, k, proposal="base", ess_threshold=0.0, generator=gen)
        u = torch.rand(k, generator=gen, dtype=torch.float64)
        hits = (torch.log(u) < res.log_phi).nonzero().squeeze(1)[: num_samples - len(accepted)].tolist()
        # Stop at the N-th acceptance: later proposals of the batch are discarded unseen.
        proposed += hits[-1] + 1 if len(accepted) + len(hits) == num_samples else k
        accepted += [list(res.token_ids[i]) for i in hits]
        accepted_phi += [float(res.log_phi[i]) for i in hits]

    n_acc = len(accepted)
    complete = n_acc == num_samples
    rate = n_acc / proposed
    z_ci = wilson_interval(n_acc, proposed)
    if not complete and not allow_partial:
        lo, hi = z_ci
        raise TwistLMError(
            f"rejection sampling: acceptance is too rare — only {n_acc} of {num_samples} requested samples accepted "
            f"in {proposed} proposals (acceptance rate {rate:.3g}, 95% CI [{lo:.3g}, {hi:.3g}]; it estimates Z). "
            "Raise max_proposals, ask for fewer samples, pass allow_partial=True, or use a learned proposal instead"
        )
    z_hat = (n_acc - 1) / (proposed - 1) if complete and n_acc >= 2 and proposed > 1 else rate
    return _result(single.prompt_texts[0], target, accepted, accepted_phi, proposed, n_acc, num_samples, z_hat)


def _check_request(target: Target, num_samples: int) -> None:
    potential = target.potential
    if not getattr(potential, "bounded", False):
        raise ConfigError(
            f"rejection sampling needs a bounded potential (0 ≤ φ ≤ 1), but {potential!r} does not declare "
            "bounded=True; use another source of exact samples (e.g. BDMC for infilling) or none"
        )
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")


def _result(
    prompt: str,
    target: Target,
    accepted: list[list[int]],
    accepted_phi: list[float],
    proposed: int,
    n_acc: int,
    requested: int,
    z_hat: float,
) -> RejectionResult:
    """The result of ``n_acc`` acceptances in ``proposed`` p0 draws, of which ``accepted`` are kept."""
    return RejectionResult(
        prompt=prompt,
        token_ids=accepted,
        texts=[target.lm.decode(target.completion_ids(s)) for s in accepted],
        num_proposed=proposed,
        num_accepted=n_acc,
        num_requested=requested,
        acceptance_rate=n_acc / proposed,
        z_hat=z_hat,
        z_ci=wilson_interval(n_acc, proposed),
        complete=len(accepted) == requested,
        log_phi=accepted_phi,
    )


def rejection_from_corpus(
    corpus: SampleCorpus, target: Target, num_samples: int, *, prompt: int = 0, seed: int = 0
) -> RejectionResult:
    """Exact σ samples by rejection over the stored p0 draws of a :class:`~twistlm.corpus.SampleCorpus`.

    The corpus rows of prompt ``prompt`` are independent p0 samples with their log φ, i.e. the proposals a rejection
    sampler would draw: each is accepted iff log U < log φ (U ~ Uniform(0, 1), seeded), and the first
    ``num_samples`` accepted rows are returned (fewer if the corpus holds fewer: ``complete=False``). All P rows are
    looked at, so Ẑ = A / P over every acceptance A is the unbiased binomial estimate (Wilson interval). Use a corpus
    (or chunk range) that trained nothing you evaluate with it, else the samples are not independent of the proposal.
    """
    _check_request(target, num_samples)
    rows = corpus.rows_of(prompt)
    if rows.numel() == 0:
        raise ConfigError(f"the corpus has no sample of prompt {prompt}")
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(rows.numel(), generator=gen, dtype=torch.float64)
    hits = rows[(torch.log(u) < corpus.log_phi[rows].double()).nonzero().squeeze(1)]
    kept = hits[:num_samples]
    accepted = [corpus.tokens[n, : int(corpus.lengths[n])].tolist() for n in kept.tolist()]
    kept_phi = [float(corpus.log_phi[n]) for n in kept.tolist()]
    proposed, n_acc = int(rows.numel()), int(hits.numel())
    return _result(
        target.prompt_texts[prompt], target, accepted, kept_phi, proposed, n_acc, num_samples, n_acc / proposed
    )
