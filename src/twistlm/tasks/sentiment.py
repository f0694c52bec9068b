"""``sentiment``: product reviews starting "I bought this" with a given star rating (default: 1 star).

Classifier: :class:`~twistlm.potentials.SentimentPotential` (VADER's compound score mapped to five review classes;
see :mod:`twistlm.potentials.classifiers` for the mapping). It reads the whole review, prompt + completion
(``include_prompt=True``; "I bought this" itself is neutral, so this only matters for custom prompts).

Potential: φ(s) = p(rating | x s)^β (β = 1 by default: p0 reweighted by the class probability, the twisted-SMC paper's
``sentiment`` target; larger β sharpens it). Bounded, so rejection sampling is exact. Goal (:func:`success`): the
classifier's most probable class is the requested rating. Default horizon T = 10 tokens (the paper's 10-token
reviews). On SmolLM2-135M-Instruct, 1-star reviews are rare: about 0.6% of 512 p0 samples had class 1 as the argmax
and E_p0[p(1 | s)] ≈ 0.014.
"""

from __future__ import annotations

from functools import lru_cache

from twistlm.lm import ParticleLM
from twistlm.potentials import Scaled, SentimentPotential
from twistlm.target import Target
from twistlm.tasks.common import Option, define_task

DEFAULT_PROMPT = "I bought this"
DEFAULT_MAX_NEW_TOKENS = 10
RATING_KEY = "rating"
"""extras[RATING_KEY]: the requested rating of each prompt (read by :func:`success`)."""

OPTIONS = {
    "rating": Option(1, "target star rating (1 = very negative … 5 = very positive)", int, choices=(1, 2, 3, 4, 5)),
    "beta": Option(1.0, "φ = p(rating | review)^beta", float, minimum=0.0),
    "prompt": Option(DEFAULT_PROMPT, "start of the review", str),
}


@lru_cache(maxsize=5)
def _classifier(rating: int) -> SentimentPotential:
    return SentimentPotential(rating, include_prompt=True)


def build(lm: ParticleLM, T: int, B: int, *, rating: int, beta: float, prompt: str) -> Target:
    classifier = _classifier(rating)
    potential = classifier if beta == 1.0 else Scaled(classifier, beta)
    return Target(lm, prompts=[prompt] * B, potential=potential, max_new_tokens=T, extras={RATING_KEY: [rating] * B})


def predicted_rating(reviews: list[str]) -> list[int]:
    """The classifier's most probable rating (1..5) for each full review text."""
    if not reviews:
        return []
    return (_classifier(1).class_log_probs(list(reviews)).argmax(dim=1) + 1).tolist()


def success(target: Target, texts: list[str], prompt_index: list[int]) -> list[bool]:
    """The goal: the classifier's argmax class of prompt + completion is the requested rating."""
    reviews = [target.prompt_texts[b] + t for b, t in zip(prompt_index, texts)]
    ratings = target.extras.get(RATING_KEY, [1] * target.num_prompts)
    return [pred == ratings[b] for pred, b in zip(predicted_rating(reviews), prompt_index)]


TASK = define_task(
    "sentiment",
    'Reviews starting "I bought this" with a target star rating (VADER-based 5-class sentiment classifier).',
    OPTIONS,
    build,
    DEFAULT_MAX_NEW_TOKENS,
    success,
)
