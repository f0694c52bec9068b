"""How close generated sentences are to reference sentences: BLEU-4, GLEU and embedding similarity, with 95% CIs.

* **BLEU-4** (corpus level, sacrebleu's standard 13a tokenization, brevity penalty; ``pip install sacrebleu``): the
  geometric mean of the modified 1–4-gram precisions times min(1, e^{1 − r/c}), in [0, 100].
* **GLEU** (Wu et al. 2016, the corpus form of NLTK's ``corpus_gleu``): with every 1–4-gram of a hypothesis and its
  reference counted, GLEU = Σ matches / max(Σ hypothesis n-grams, Σ reference n-grams), i.e. the smaller of corpus
  n-gram precision and recall, in [0, 1]. Tokens: lower-cased words and punctuation marks.
* **Embedding similarity**: mean cosine similarity of hypothesis and reference sentence embeddings
  (:func:`twistlm.diversity.embed`, all-MiniLM-L6-v2 by default), in [−1, 1].

Intervals: BLEU and GLEU are corpus statistics, so their 95% interval is a percentile bootstrap over sentence pairs
(:data:`BOOTSTRAP_SAMPLES` resamples, seeded); the similarity is a mean, so mean ± 1.96 standard errors.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from twistlm.errors import ConfigError
from twistlm.solve import Z_95

MAX_ORDER = 4
BLEU_SMOOTHING = "exp"
"""sacrebleu's default for ``corpus_bleu`` (its static ``compute_bleu`` defaults to none: 0 as soon as one n-gram
order has no match, as happens for short generated sentences)."""
BOOTSTRAP_SAMPLES = 1000
_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Interval:
    """A statistic and its 95% interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return asdict(self)


def words(text: str) -> list[str]:
    """GLEU's tokens: lower-cased runs of word characters and single punctuation marks."""
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str]) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(tokens) - n + 1))


def gleu_counts(hypothesis: str, reference: str) -> tuple[int, int, int]:
    """(matching n-grams, hypothesis n-grams, reference n-grams) over orders 1…4 of one pair."""
    hyp, ref = _ngrams(words(hypothesis)), _ngrams(words(reference))
    return sum((hyp & ref).values()), sum(hyp.values()), sum(ref.values())


def corpus_gleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus GLEU (module docstring); 0 when nothing has an n-gram."""
    _check(hypotheses, references)
    counts = torch.tensor([gleu_counts(h, r) for h, r in zip(hypotheses, references)], dtype=torch.float64)
    return _gleu_of(counts)


def _gleu_of(counts: torch.Tensor) -> float:
    match, hyp, ref = counts.sum(0).tolist()
    denom = max(hyp, ref)
    return match / denom if denom > 0 else 0.0


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU-4 with one reference per hypothesis."""
    return _bleu_of(_bleu_stats(hypotheses, references))


def _bleu_metric():
    check_scorers(None)
    from sacrebleu.metrics import BLEU

    return BLEU()


def check_scorers(encoder: str | None) -> None:
    """Fail in one line, before any model loads, when sacrebleu or the default sentence encoder is not installed."""
    from twistlm.diversity import DEFAULT_ENCODER, encoder_path

    try:
        import sacrebleu  # noqa: F401
    except ImportError:
        raise ConfigError("BLEU needs the package sacrebleu (pip install sacrebleu, or twistlm[experiments])") from None
    if encoder in (None, DEFAULT_ENCODER):
        encoder_path(DEFAULT_ENCODER)


def _bleu_stats(hypotheses: Sequence[str], references: Sequence[str]) -> torch.Tensor:
    """Per pair: [hyp length, ref length, matches_1..4, totals_1..4] (sacrebleu's sufficient statistics)."""
    _check(hypotheses, references)
    metric = _bleu_metric()
    rows = []
    for h, r in zip(hypotheses, references):
        s = metric.corpus_score([h], [[r]])
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return torch.tensor(rows, dtype=torch.float64)


def _bleu_of(stats: torch.Tensor) -> float:
    """Corpus BLEU from summed sufficient statistics, computed by sacrebleu (its default ``exp`` smoothing)."""
    from sacrebleu.metrics import BLEU

    total = [int(v) for v in stats.sum(0).tolist()]
    c, r = total[0], total[1]
    matches, totals = total[2 : 2 + MAX_ORDER], total[2 + MAX_ORDER :]
    return float(BLEU.compute_bleu(matches, totals, c, r, smooth_method=BLEU_SMOOTHING).score)


def _bootstrap(per_pair: torch.Tensor, statistic, generator: torch.Generator) -> Interval:
    n = per_pair.shape[0]
    draws = torch.randint(0, n, (BOOTSTRAP_SAMPLES, n), generator=generator)
    values = torch.tensor([statistic(per_pair[d]) for d in draws], dtype=torch.float64)
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Interval(statistic(per_pair), low, high)


def similarity(hypotheses: Sequence[str], references: Sequence[str], encoder: str | None = None) -> Interval:
    """Mean cosine similarity of paired sentence embeddings, ± 1.96 standard errors."""
    from twistlm.diversity import DEFAULT_ENCODER, embed

    _check(hypotheses, references)
    name = encoder or DEFAULT_ENCODER
    cos = (embed(list(hypotheses), name) * embed(list(references), name)).sum(-1).double()
    mean = float(cos.mean())
    half = Z_95 * float(cos.std()) / math.sqrt(len(cos)) if len(cos) > 1 else math.inf
    return Interval(mean, mean - half, mean + half)


def overlap_scores(hypotheses: Sequence[str], references: Sequence[str], *, seed: int = 0,
                   encoder: str | None = None) -> dict[str, Interval]:
    """BLEU-4, GLEU and embedding similarity of paired hypotheses and references, each with its 95% interval."""
    _check(hypotheses, references)
    gen = torch.Generator().manual_seed(seed)
    gleu = torch.tensor([gleu_counts(h, r) for h, r in zip(hypotheses, references)], dtype=torch.float64)
    return {
        "bleu": _bootstrap(_bleu_stats(hypotheses, references), _bleu_of, gen),
        "gleu": _bootstrap(gleu, _gleu_of, gen),
        "similarity": similarity(hypotheses, references, encoder),
    }


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ConfigError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ConfigError("no sentences to score")
