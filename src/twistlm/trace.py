"""Per-step record of an SMC run: what the HTML run view (:mod:`twistlm.html.run_page`) shows step by step.

:class:`SMCTrace` is a sampler callback (``run_smc(..., callback=trace)``). After every step t it copies, from the
``info`` the sampler hands its callback (see :data:`twistlm.smc.StepCallback`), the chosen token of every particle,
the log weights W_t, the tool-forced flags and, with a twist, log ψ_t of the chosen tokens. All of it is in particle
order *before* the resampling decision of step t; the ancestry itself (which particle each one was resampled from)
is in the :class:`~twistlm.result.SMCResult` (``resampled_at`` / ``ancestors``), so the trace does not repeat it.

Contract of one group's record (:class:`GroupTrace`, n = steps run, K particles, slot k = row k of the group):

* ``tokens[t−1, k]``: the token slot k chose at step t, or :data:`INACTIVE` if that slot had already finished;
* ``log_weights[t−1, k]``: W^k after step t (before resampling), −∞ for weight zero;
* ``forced[t−1, k]``: the token was spliced in by the target's tool (not sampled);
* ``log_psi[t−1, k]`` (twisted runs only): log ψ_t of the chosen prefix, NaN where inactive.

Slot k at step t continues slot ``parent_t(k)`` of step t − 1: ``ancestors[i][k]`` when the run resampled after step
t − 1 (``resampled_at[i] == t − 1``), else k itself (:meth:`GroupTrace.parents`). Following parents back from the
final slots gives each final particle's tokens (:meth:`GroupTrace.prefix_tokens`) and ``SMCResult.lineage()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from twistlm.errors import ConfigError

INACTIVE = -1
"""Token id recorded for a slot that had finished before the step (its row holds EOS padding in the sampler)."""


class _Decoder(Protocol):
    """Anything with ``decode(token_ids) -> str`` (a :class:`~twistlm.lm.ParticleLM`)."""

    def decode(self, token_ids: list[int]) -> str: ...


@dataclass
class GroupTrace:
    """The record of one group (one prompt) of a traced run; see the module docstring for the contract."""

    tokens: torch.Tensor
    log_weights: torch.Tensor
    forced: torch.Tensor
    log_psi: torch.Tensor | None
    decoder: _Decoder

    @property
    def num_steps(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_particles(self) -> int:
        return int(self.tokens.shape[1])

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (tokenizers that split a character over tokens show a placeholder)."""
        return self.decoder.decode([int(token_id)])

    def parents(self, resampled_at: list[int], ancestors: list) -> list[list[int]]:
        """``parents[t−1][k]``: the slot of step t − 1 that slot k of step t continues (identity at t = 1)."""
        by_step = {int(t): [int(a) for a in anc] for t, anc in zip(resampled_at, ancestors)}
        K = self.num_particles
        identity = list(range(K))
        return [by_step.get(t - 1, identity) for t in range(1, self.num_steps + 1)]

    def prefix_tokens(self, t: int, resampled_at: list[int], ancestors: list) -> list[list[int]]:
        """Token ids s_1:t of every slot at step t (inactive steps skipped), reconstructed through the ancestry."""
        if not 1 <= t <= self.num_steps:
            raise ConfigError(f"step must lie in [1, {self.num_steps}], got {t}")
        parents = self.parents(resampled_at, ancestors)
        rows = self.tokens.tolist()
        out = []
        for k in range(self.num_particles):
            ids, slot = [], k
            for step in range(t, 0, -1):
                tok = rows[step - 1][slot]
                if tok != INACTIVE:
                    ids.append(tok)
                slot = parents[step - 1][slot]
            out.append(ids[::-1])
        return out


class SMCTrace:
    """Sampler callback that records every step of one run (module docstring). Use a fresh trace per run.

    ``lm``: decodes single tokens for the page's token table. ``then``: another callback to call after recording
    (e.g. a progress bar).
    """

    def __init__(self, lm: _Decoder, then: Callable[[int, int, dict], None] | None = None):
        if not callable(getattr(lm, "decode", None)):
            raise ConfigError("SMCTrace needs the run's language model (anything with decode(token_ids))")
        self.lm, self.then = lm, then
        self._tokens: list[torch.Tensor] = []
        self._log_w: list[torch.Tensor] = []
        self._forced: list[torch.Tensor] = []
        self._log_psi: list[torch.Tensor] = []
        self.shape: tuple[int, int] | None = None

    def __call__(self, t: int, T: int, info: dict) -> None:
        log_w = info["log_weights"]
        if t != len(self._tokens) + 1 or (self.shape is not None and tuple(log_w.shape) != self.shape):
            raise ConfigError("an SMCTrace records exactly one run: create a new SMCTrace for every run")
        self.shape = tuple(log_w.shape)
        active = info["active"].cpu()
        self._tokens.append(torch.where(active, info["tokens"].cpu(), torch.full_like(active, INACTIVE, dtype=torch.long)))
        self._log_w.append(log_w.detach().to(device="cpu", dtype=torch.float64).reshape(-1).clone())
        forced = info.get("forced")
        self._forced.append(forced.cpu().clone() if forced is not None else torch.zeros_like(active))
        psi = info.get("log_psi")
        if psi is not None:
            psi = psi.detach().to(device="cpu", dtype=torch.float64)
            self._log_psi.append(torch.where(active, psi, torch.full_like(psi, float("nan"))))
        if self.then is not None:
            self.then(t, T, info)

    @property
    def num_steps(self) -> int:
        return len(self._tokens)

    @property
    def num_groups(self) -> int:
        return 0 if self.shape is None else self.shape[0]

    def group(self, b: int) -> GroupTrace:
        """The record of group (prompt) ``b``."""
        if self.shape is None:
            raise ConfigError("the trace is empty: pass it to the sampler as callback=trace first")
        B, K = self.shape
        if not 0 <= b < B:
            raise ConfigError(f"group must lie in [0, {B - 1}], got {b}")
        rows = slice(b * K, (b + 1) * K)
        psi = torch.stack(self._log_psi)[:, rows] if len(self._log_psi) == self.num_steps else None
        return GroupTrace(
            tokens=torch.stack(self._tokens)[:, rows].long(),
            log_weights=torch.stack(self._log_w)[:, rows],
            forced=torch.stack(self._forced)[:, rows].bool(),
            log_psi=psi,
            decoder=self.lm,
        )
