"""Ratio twist: ψ_t as the density ratio of a LoRA-adapted copy q_θ of the base model to p0 (MATH.md, "Twists and
proposals"; the parameterisation of the twisted-SMC follow-up work on small instruct models).

    log ψ_t(s_1:t) = log q_θ(s_1:t | x) − log p0(s_1:t | x) = Σ_{i ≤ t} [log q_θ(s_i | s_<i) − log p0(s_i | s_<i)]

so at step t the twist over the vocabulary is log ψ_t(s_<t, v) = c(s_<t) + log q_θ(v | s_<t) − log p0(v | s_<t) with
c(s_<t) = log ψ_t−1(s_<t). Three consequences:

* the twisted proposal q_t(v) ∝ p0(v | s_<t) ψ_t(s_<t, v) is exactly q_θ(v | s_<t), and the twist is 0 when the
  adapters are (peft's initialisation): training starts from ψ ≡ 1, i.e. from base SMC;
* the twist is **normalised**: Σ_v p0(v | s_<t) ψ_t(s_<t, v) = ψ_t−1(s_<t), so Z_t = Σ_{s_1:t} p0 ψ_t = 1 for
  every θ and SMC's incremental weights are 1 until the last step (where φ / ψ_T enters): the intermediate targets
  π_t are q_θ's own marginals;
* CTL's negative term, an estimate of ∇ log Z_t, is exactly 0: CTL reduces to maximising Σ_t E_σ[log q_θ(s_1:t)],
  maximum likelihood of q_θ on target samples (:mod:`twistlm.losses`; the corpus trainer then draws no negatives).

p0's log-probabilities come from the base LM's hidden state (``TwistContext.hidden`` when sampling, the corpus's
stored features when training) through the copy's frozen output layer, which LoRA does not adapt. The cumulative
c(s_<t) follows the particles through resampling with the cached rows (:mod:`twistlm.twists.adapted`); when a state
is rebuilt it is recomputed from the prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from twistlm.errors import ConfigError
from twistlm.lm import HFLM, ParticleLM
from twistlm.twists.adapted import AdaptedCopyTwist, Parent
from twistlm.twists.base import TwistContext
from twistlm.twists.mlp import seeded_init

if TYPE_CHECKING:  # pragma: no cover
    from twistlm.twists.features import PrefixFeatures


class RatioTwist(AdaptedCopyTwist):
    """log ψ_t = log q_θ(s_1:t) − log p0(s_1:t) with q_θ a LoRA-adapted copy of the base model (module docstring)."""

    kind = "ratio"
    normalised = True
    """Σ_v p0(v | s_<t) ψ_t(s_<t, v) = ψ_t−1(s_<t) for every prefix and every θ (so Z_t ≡ 1)."""

    def __init__(self, model: Any, eos_token_id: int, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: str | list[str] = "all-linear", base_model: str = "", condition: str = "prompt"):
        super().__init__(model, eos_token_id, r, alpha, dropout, target_modules, base_model, condition)
        self._offset: torch.Tensor | None = None  # (N,) c(s_<t) of the cached rows
        self._ratio: torch.Tensor | None = None  # (N, V) log q_θ − log p0 after the cached rows' prefixes

    @classmethod
    def for_lm(cls, lm: ParticleLM, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear", seed: int = 0, output: str = "log",
               condition: str = "prompt") -> RatioTwist:
        """A ratio twist over ``lm`` (a Hugging Face model); ψ ≡ 1 at initialisation (LoRA's B = 0), the adapters'
        A matrices drawn from ``seed``. ``output``: only ``"log"`` — ψ is a density ratio, unbounded above, so it
        cannot be FUDGE's probability (``"sigmoid"``). ``condition``: what q_θ reads (:mod:`twistlm.conditioning`);
        with ``"observation"`` the twist is log q_θ(s_1:t | o, x) − log p0(s_1:t | x), still normalised, but no
        longer 0 at initialisation (q_θ then is p0 reading o, a head start for infilling)."""
        if output != "log":
            raise ConfigError(f"the ratio twist's ψ is a density ratio (output 'log'), not {output!r}; FUDGE needs a "
                              "bounded head such as --twist-kind mlp")
        if not isinstance(lm, HFLM):
            raise ConfigError("the ratio twist needs a Hugging Face base model (it adapts a copy of it); for another "
                              "model choose a head, e.g. --twist-kind embedding")
        return seeded_init(
            lambda: cls(lm.model, lm.eos_token_id, r, alpha, dropout, target_modules, lm.name, condition), seed
        )

    # -- log-probabilities ---------------------------------------------------------------------------------------------

    def _logp(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.output_head
        return torch.log_softmax(head(hidden.to(device=head.weight.device, dtype=head.weight.dtype)).float(), dim=-1)

    def _step_ratio(self, adapted_hidden: torch.Tensor, base_hidden: torch.Tensor,
                    logp0: torch.Tensor | None = None) -> torch.Tensor:
        """(…, V) log q_θ(· | s_<t) − log p0(· | s_<t) (``logp0`` when the caller has it, else from the base LM's
        hidden state); grad flows through q_θ only."""
        logq = self._logp(adapted_hidden)
        if logp0 is None or logp0.shape[-1] != logq.shape[-1]:
            with torch.no_grad():
                logp0 = self._logp(base_hidden)
        return logq - logp0.to(logq.device, logq.dtype).detach()

    # -- sampling --------------------------------------------------------------------------------------------------------

    def log_psi(self, ctx: TwistContext) -> torch.Tensor:
        hidden, parent = self._sync(ctx)
        ratio = self._step_ratio(hidden, ctx.hidden, ctx.logp0)
        offset = self._carry(parent, ctx)
        self._offset, self._ratio = offset, ratio
        return (offset.unsqueeze(1) + ratio).to(ctx.hidden.device)

    def _carry(self, parent: Parent | None, ctx: TwistContext) -> torch.Tensor:
        """(N,) c(s_<t): the parent rows' offsets plus the ratio of the token appended, or recomputed."""
        if parent is not None and self._offset is not None:
            index, appended = parent
            offset = self._offset[index]
            if appended:
                last = ctx.tokens[:, -1].to(self._ratio.device)
                offset = offset + self._ratio[index].gather(1, last[:, None]).squeeze(1)
            return offset
        return self._prefix_offset(ctx.prompt_index, ctx.tokens)

    @torch.no_grad()
    def _prefix_offset(self, prompt_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(N,) log q_θ(s_<t) − log p0(s_<t), from forwards of the copy with its adapters (after what it reads) and
        without them (after the target's prompts: p0)."""
        device = self.output_head.weight.device
        if tokens.shape[1] == 0:
            return torch.zeros(tokens.shape[0], device=device)
        prompt_index = prompt_index.cpu().long()
        tokens = tokens.cpu()
        logq = self._logp(self.prefix_hidden(self._rows(prompt_index), tokens))
        with self.peft.disable_adapter():
            logp0 = self._logp(self.prefix_hidden(self.base_rows(prompt_index), tokens))
        at = tokens.to(device).unsqueeze(-1)
        return (logq.gather(-1, at) - logp0.gather(-1, at)).squeeze(-1).sum(dim=1)

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        if self._offset is not None:
            self._offset, self._ratio = self._offset[index], self._ratio[index]

    def train(self, mode: bool = True):
        self._offset = self._ratio = None
        return super().train(mode)

    # -- training --------------------------------------------------------------------------------------------------------

    def log_psi_tokens(self, hidden: torch.Tensor, tokens: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """(N, T) log ψ_t(s_1:t) at the stored tokens, with grad: the cumulative log q_θ − log p0. ``hidden``
        (N, T, H): the base LM's h_t(s_<t) (p0's side); the prompts are the bound target's."""
        rows = self._rows(prompt_index.cpu().long())
        return self._cumulative(self.prefix_hidden(rows, tokens), hidden, tokens)

    def log_psi_prefixes(self, feats: PrefixFeatures) -> torch.Tensor:
        """(N, T, V) log ψ_t(s_<t, v) over all prefixes and tokens, with grad (the on-policy trainers' input)."""
        ratio = self._step_ratio(self.prefix_hidden(self.feature_rows(feats), feats.tokens), feats.hidden, feats.logp0)
        at = feats.tokens.to(ratio.device).unsqueeze(-1)
        taken = ratio.gather(-1, at).squeeze(-1)
        offset = torch.cumsum(taken, dim=1) - taken  # c(s_<t): the ratios of s_1 … s_t−1
        return offset.unsqueeze(-1) + ratio

    def _cumulative(self, adapted_hidden: torch.Tensor, base_hidden: torch.Tensor, tokens: torch.Tensor):
        at = tokens.to(adapted_hidden.device).unsqueeze(-1)
        logq = self._logp(adapted_hidden).gather(-1, at).squeeze(-1)
        with torch.no_grad():
            logp0 = self._logp(base_hidden).gather(-1, at).squeeze(-1)
        return torch.cumsum(logq - logp0, dim=1)

    # -- persistence -----------------------------------------------------------------------------------------------------

    def config(self) -> dict:
        return self.adapter_config()
