"""What an amortized sampler reads: its prompt for each of the target's prompts (registry ``CONDITIONS``).

Used by GFlowNet policies (:mod:`twistlm.gfn`) and by the twists that run their own adapted copy of the base model
(:mod:`twistlm.twists.adapted`: a ratio twist reading o is q_θ(z | x, o), the observation-conditioned twist of
infilling). Below, "the policy" is either.

The target σ(z | x, o) ∝ p0(z | x) φ(z) of a latent-variable task depends on an observation o as well as the prompt
x (the ending of an infilling problem, the label after a rationale): o lives in ``target.extras["observation"]``,
which the potential reads, not in the prompt p0 sees. A policy amortized over many (x, o) must see o too, or the
best it can learn is a mixture over observations. A *condition* maps a target to the policy's prompt token ids,
one per target prompt; the policy samples and scores z after those, while p0, the rewards and every weight keep
using the target's own prompts — so the SMC weights p0 φ / q stay exact whatever the policy reads.

* ``prompt`` — the target's prompts unchanged: q_θ(z | x).
* ``observation`` — :class:`ObservationFirst`: ``"Ending: " o "\\n\\n" x``, o before x so that z still directly
  follows x (at initialisation the policy is p0(z | o-header, x), already close to p0(z | x)): q_θ(z | x, o).
  o is given as token ids (BDMC endings, used as is) or text (tokenized, surrounding whitespace dropped).

A trained policy records its condition's name (``gfn_policy.json``); the loaders attach the condition to the policy
LM as ``.condition``, where :func:`twistlm.policy_proposal.policy_prompt_ids` finds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twistlm.errors import ConfigError
from twistlm.potentials.likelihood import OBSERVATION_KEY
from twistlm.target import Target

Condition = Callable[[Target], list[list[int]]]


def prompt_only(target: Target) -> list[list[int]]:
    """The target's prompt ids (the policy reads what p0 reads)."""
    return [list(ids) for ids in target.prompt_ids]


@dataclass(frozen=True)
class ObservationFirst:
    """``header o separator x`` per prompt (module docstring); a leading BOS of x stays first."""

    header: str = "Ending: "
    separator: str = "\n\n"

    def __call__(self, target: Target) -> list[list[int]]:
        observations = target.extras.get(OBSERVATION_KEY)
        if observations is None:
            raise ConfigError(
                f"this policy reads the observation, but the target has no extras[{OBSERVATION_KEY!r}] "
                "(it was trained for a latent-variable task: infilling, subjectivity)"
            )
        lm = target.lm
        head = lm.tokenize(self.header) if self.header else []
        sep = lm.tokenize(self.separator) if self.separator else []
        bos = getattr(getattr(lm, "tokenizer", None), "bos_token_id", None)
        out = []
        for ids, obs in zip(target.prompt_ids, observations):
            obs_ids = lm.tokenize(obs.strip()) if isinstance(obs, str) else [int(t) for t in obs]
            lead = [ids[0]] if bos is not None and ids and ids[0] == bos else []
            out.append(lead + head + obs_ids + sep + list(ids[len(lead):]))
        return out


CONDITIONS: dict[str, Condition] = {"prompt": prompt_only, "observation": ObservationFirst()}


def get_condition(name: str) -> Condition:
    if name not in CONDITIONS:
        raise ConfigError(f"unknown policy condition {name!r}; known: {', '.join(CONDITIONS)}")
    return CONDITIONS[name]


def default_condition(target: Target) -> str:
    """``observation`` for a target with observations in its extras, else ``prompt``."""
    return "observation" if OBSERVATION_KEY in target.extras else "prompt"
