"""What a sampler returns: particles, weights, the evidence estimate and the diagnostics a user inspects."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class SMCResult:
    """The particle approximation of σ for one prompt.

    texts / token_ids: the K final completions (token ids include a finishing EOS; texts drop it).
    log_weights: (K,) unnormalised log weights W^k accumulated since the last resampling.
    log_z: log Ẑ, the evidence estimate (unbiased in Ẑ; a lower bound on log Z in expectation).
    log_phi: (K,) log φ of each final completion.
    ess: effective sample size at every step, before the resampling decision.
    resampled_at: the steps t (1-based) after which the particles were resampled.
    ancestors: for each resampling event, the (K,) ancestor index of each new particle.
    finished_by_eos: whether each particle stopped on a stop token (rather than reaching T).
    """

    prompt: str
    texts: list[str]
    token_ids: list[list[int]]
    log_weights: torch.Tensor
    log_z: float
    log_phi: torch.Tensor
    ess: list[float] = field(default_factory=list)
    resampled_at: list[int] = field(default_factory=list)
    ancestors: list[torch.Tensor] = field(default_factory=list)
    finished_by_eos: list[bool] = field(default_factory=list)

    @property
    def num_particles(self) -> int:
        return len(self.texts)

    @property
    def normalized_weights(self) -> torch.Tensor:
        """ŵ^k = softmax(W)_k: the self-normalised weights (all zero if every particle has weight zero)."""
        if torch.isneginf(self.log_weights).all():
            return torch.zeros_like(self.log_weights)
        return torch.softmax(self.log_weights, dim=0)

    @property
    def log_normalized_weights(self) -> torch.Tensor:
        return self.log_weights - torch.logsumexp(self.log_weights, dim=0)

    def lineage(self) -> list[int]:
        """For each final particle, the index of the initial particle (step 0) it descends from."""
        origin = list(range(self.num_particles))
        for anc in reversed(self.ancestors):
            origin = [int(anc[i]) for i in origin]
        return origin

    def distinct(self) -> list[tuple[str, float, int]]:
        """Distinct completions with their total normalised weight and particle count, heaviest first."""
        weight: dict[str, float] = defaultdict(float)
        count: dict[str, int] = defaultdict(int)
        for text, w in zip(self.texts, self.normalized_weights.tolist()):
            weight[text] += w
            count[text] += 1
        return sorted(((t, weight[t], count[t]) for t in weight), key=lambda x: -x[1])

    def to_html(self, path, *, trace=None, group: int | None = None, settings: dict | None = None,
                title: str | None = None):
        """Write a self-contained HTML view of this run to ``path`` (atomically; works offline) and return the path.

        ``trace``: the :class:`twistlm.trace.SMCTrace` that was the run's ``callback`` (adds the step view, the
        tool-token marks and log ψ); with several prompts pass ``group=b``, this result's prompt index.
        ``settings``: name → value shown in the page (model, target, proposal, twist, seed, ...). See
        :mod:`twistlm.html.run_page`.
        """
        from twistlm.errors import ConfigError
        from twistlm.html.run_page import DEFAULT_TITLE, write_run_page
        from twistlm.trace import SMCTrace

        if isinstance(trace, SMCTrace):
            if group is None and trace.num_groups > 1:
                raise ConfigError(f"the trace holds {trace.num_groups} prompts: pass group=b (this result's prompt)")
            trace = trace.group(group or 0)
        elif group is not None:
            raise ConfigError("group= selects a prompt of an SMCTrace; pass trace=SMCTrace too")
        return write_run_page(path, [self], trace, settings, title or DEFAULT_TITLE)

    def to_dict(self) -> dict:
        """JSON-ready summary (−inf is written as null)."""

        def num(x: float) -> float | None:
            return None if math.isinf(x) or math.isnan(x) else x

        return {
            "prompt": self.prompt,
            "log_z": num(self.log_z),
            "particles": [
                {
                    "text": t,
                    "token_ids": ids,
                    "log_weight": num(float(lw)),
                    "weight": float(w),
                    "log_phi": num(float(lp)),
                    "finished_by_eos": e,
                }
                for t, ids, lw, w, lp, e in zip(
                    self.texts,
                    self.token_ids,
                    self.log_weights.tolist(),
                    self.normalized_weights.tolist(),
                    self.log_phi.tolist(),
                    self.finished_by_eos,
                )
            ],
            "ess": self.ess,
            "resampled_at": self.resampled_at,
            "ancestors": [a.tolist() for a in self.ancestors],
            "lineage": self.lineage(),
        }
