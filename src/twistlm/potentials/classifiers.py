"""Classifier potentials: φ(s) = p(c | s), the probability a text classifier gives to a class c.

A classifier potential returns log p(c | text) for a batch of texts; it is bounded (0 ≤ p ≤ 1), so rejection
sampling from p0 gives exact target samples (MATH.md, "Exact target samples"). Temper it with
``Scaled(potential, β)`` (φ = p(c | s)^β) or threshold it with ``Threshold(potential, 0.5, on="prob")``
(see :mod:`twistlm.potentials.combinators`). By default the classifier reads the completion s only;
``include_prompt=True`` makes it read prompt + completion.

Three implementations:

* :class:`HFClassifierPotential` — any Hugging Face sequence-classification model (hub id or local directory),
  ``log_softmax`` over its logits, the class picked by label name or index. A model with a single logit z (a binary
  "score" head) is read as p(index 1) = sigmoid(z), p(index 0) = sigmoid(−z).
* :class:`ToxicityPotential` — ``alt-profanity-check`` (a calibrated linear SVM on bag-of-words, no network, fast on
  CPU): p(toxic | s) = ``profanity_check.predict_prob``. Its sigmoid calibration rounds to exactly 0 or 1 for extreme
  texts; probabilities are clipped to [``PROB_FLOOR``, 1 − ``PROB_FLOOR``] so that a soft classifier never becomes a
  hard constraint (log φ = −∞) by float rounding.
* :class:`SentimentPotential` — VADER (``vaderSentiment``, a rule-based lexicon scorer) mapped to five review
  classes (1 = very negative … 5 = very positive). VADER gives one ``compound`` score x ∈ [−1, 1], not class
  probabilities; we turn it into a proper distribution over the five classes with Gaussian kernels around class
  centres:

      p(c | s) = exp(−(x − μ_c)² / (2 w²)) / Σ_c' exp(−(x − μ_c')² / (2 w²)),
      μ = (−0.75, −0.275, 0, 0.275, 0.75) = ``SENTIMENT_CENTRES``,  w = 0.25 = ``SENTIMENT_WIDTH``.

  Why these centres: VADER's documented convention calls x ≥ 0.05 positive, x ≤ −0.05 negative and the rest neutral,
  and |x| ≥ 0.5 is the usual cut for *strongly* polar text. The centres are the midpoints of the resulting bands
  [−1, −0.5], [−0.5, −0.05], [−0.05, 0.05], [0.05, 0.5], [0.5, 1]. With equal widths the most probable class
  switches halfway between neighbouring centres (at ±0.14 and ±0.51), i.e. at VADER's strong-polarity cut and at a
  neutral band a little wider than VADER's ±0.05 (single words push x past 0.05 easily). Equally spaced centres at
  −1, −0.5, 0, 0.5, 1 would be a poor fit: VADER's compound is x = v / sqrt(v² + 15) for a summed lexicon valence v,
  which saturates slowly — a sentence as plainly negative as "This is the worst product ever, total garbage" scores
  only −0.62, nearer −0.5 than −1. The width w = 0.25 keeps the classes soft (a neutral text, x = 0, gets
  p(3) ≈ 0.47 and p(2) = p(4) ≈ 0.26) while clearly polar text lands in class 1 or 5 (x = −0.62: p(1) ≈ 0.68,
  p(2) ≈ 0.29; x = 0.86: p(5) ≈ 0.93; x = ±1: p ≈ 0.975). Being a softmax, the five probabilities sum to one and each
  is ≤ 1, so the potential is bounded. It is a calibrated-looking *proxy*, not a trained review classifier.

The reference experiments (twisted SMC, Zhao et al. 2024, github.com/Silent-Zebra/twisted-smc-lm) used neural
classifiers from the Hugging Face hub instead; where the hub is reachable they are one line each:

* toxicity: the RoBERTa classifier ``nicholasKluge/ToxicityModel`` (one logit z, positive = non-toxic), so
  ``HFClassifierPotential("nicholasKluge/ToxicityModel", label=0)`` is log p(toxic | s) = log sigmoid(−z) and
  ``label=1`` is log p(non-toxic | s); the paper's target σ ∝ p0 · p(toxic | s)^β is
  ``Scaled(HFClassifierPotential(...), beta)`` (TinyStories base model);
* sentiment: the five-class Amazon-review classifier ``LiYuan/amazon-review-sentiment-analysis`` (labels
  "1 star" … "5 stars"), e.g. ``HFClassifierPotential("LiYuan/amazon-review-sentiment-analysis", label="1 star")``
  or ``label=0`` for class 1 (GPT-2 medium base model, 10-token reviews).

CLI specs: ``toxicity`` / ``toxicity:nontoxic``, ``sentiment:1`` … ``sentiment:5``, ``classifier:MODEL[:LABEL]``.
The heavy libraries (profanity_check, vaderSentiment, transformers) are imported inside the constructors.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from twistlm.errors import ConfigError, ModelLoadError
from twistlm.potentials.base import Potential, Sequences
from twistlm.potentials.simple import register_potential

PROB_FLOOR = 1e-7
"""ToxicityPotential clips p(toxic) to [PROB_FLOOR, 1 − PROB_FLOOR] (see the module docstring)."""

SENTIMENT_CENTRES = (-0.75, -0.275, 0.0, 0.275, 0.75)
"""μ_c for the five review classes 1..5 on VADER's compound scale (midpoints of VADER's conventional bands)."""

SENTIMENT_WIDTH = 0.25
"""w, the common width of the Gaussian kernels that turn VADER's compound score into five class probabilities."""

TOXICITY_LABELS = ("nontoxic", "toxic")


class ClassifierPotential(Potential):
    """log φ(s) = log p(label | text), batched. Subclasses implement :meth:`class_log_probs`.

    classes: the class names, in the classifier's order. label_index: the class whose probability is φ.
    include_prompt: classify prompt + completion instead of the completion alone.
    """

    bounded = True
    classes: tuple[str, ...] = ()
    label_index: int = 0
    include_prompt: bool = False

    @abstractmethod
    def class_log_probs(self, texts: list[str]) -> torch.Tensor:
        """(N, C) float64: log p(c | text) for every class, each row a normalised distribution."""

    def log_prob(self, texts: list[str]) -> torch.Tensor:
        """(N,) log p(label | text)."""
        if not texts:
            return torch.zeros(0, dtype=torch.float64)
        return self.class_log_probs(texts)[:, self.label_index]

    def classify_texts(self, seqs: Sequences) -> list[str]:
        if self.include_prompt:
            return [p + t for p, t in zip(seqs.prompts, seqs.texts)]
        return list(seqs.texts)

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        return self.log_prob(self.classify_texts(seqs))

    def _resolve_label(self, label: int | str) -> int:
        names = [c.lower() for c in self.classes]
        if isinstance(label, str) and label.strip().lower() in names:
            return names.index(label.strip().lower())
        try:
            index = int(label)
        except (TypeError, ValueError):
            index = None
        if index is None or isinstance(label, bool) or not 0 <= index < len(self.classes):
            raise ConfigError(
                f"unknown label {label!r} for {self.name!r}; choose a name from {list(self.classes)} "
                f"or an index 0..{len(self.classes) - 1}"
            )
        return index


class HFClassifierPotential(ClassifierPotential):
    """log p(label | text) from a Hugging Face ``AutoModelForSequenceClassification`` (hub id or local directory).

    label: a class name from the model's ``id2label`` (case-insensitive) or an index; None picks class 1 of a binary
    model and is an error for more classes. Single-logit models have the two classes ``("negative", "positive")``
    (p = sigmoid(∓z)). Texts are truncated to ``max_length`` tokens (default:
    the tokenizer's limit) and classified ``batch_size`` at a time on ``device``.
    """

    def __init__(
        self,
        name_or_path: str | Path,
        label: int | str | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        include_prompt: bool = False,
        max_length: int | None = None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        name = str(name_or_path)
        local = Path(name).expanduser()
        looks_local = name.startswith((".", "/", "~")) or local.exists()
        if looks_local and not local.is_dir():
            raise ModelLoadError(f"classifier path not found: {name}")
        source = str(local) if looks_local else name
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForSequenceClassification.from_pretrained(source)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            where = "local directory" if looks_local else "hub id (is the hub reachable?)"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelLoadError(f"could not load classifier {name!r} as a {where}: {first}") from exc
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if tokenizer.pad_token_id is None:  # decoder classifiers (GPT-2, Llama) often ship without one
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id  # sequence-classification heads pool the last non-pad
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.include_prompt = include_prompt
        limit = getattr(tokenizer, "model_max_length", None)
        self.max_length = max_length or (limit if isinstance(limit, int) and limit < 1_000_000 else None)
        self.single_logit = int(model.config.num_labels) == 1
        if self.single_logit:
            self.classes = ("negative", "positive")
        else:
            id2label = getattr(model.config, "id2label", None) or {}
            self.classes = tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(int(model.config.num_labels)))
        self.name = f"classifier:{name}"
        if label is None and len(self.classes) != 2:
            raise ConfigError(f"{self.name!r} has {len(self.classes)} classes {list(self.classes)}: give a label")
        self.label_index = self._resolve_label(1 if label is None else label)
        self.name = f"classifier:{name}:{self.classes[self.label_index]}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def class_log_probs(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits.double()
            if self.single_logit:
                z = logits[:, 0]
                out.append(torch.stack([torch.nn.functional.logsigmoid(-z), torch.nn.functional.logsigmoid(z)], 1))
            else:
                out.append(torch.log_softmax(logits, dim=-1))
        return torch.cat(out).cpu()


class ToxicityPotential(ClassifierPotential):
    """log p(toxic | s) (``label="toxic"``) or log p(not toxic | s) (``label="nontoxic"``) from alt-profanity-check."""

    classes = TOXICITY_LABELS

    def __init__(self, label: str = "toxic", include_prompt: bool = False):
        try:
            from profanity_check import predict_prob
        except ImportError as exc:  # a declared dependency; only a broken install gets here
            raise ModelLoadError("ToxicityPotential needs `pip install alt-profanity-check`") from exc
        self._predict_prob = predict_prob
        self.include_prompt = include_prompt
        self.name = "toxicity"
        self.label_index = self._resolve_label(label)
        self.name = f"toxicity:{self.classes[self.label_index]}"

    def class_log_probs(self, texts: list[str]) -> torch.Tensor:
        p = torch.as_tensor(self._predict_prob(list(texts)), dtype=torch.float64).reshape(-1)
        p = p.clamp(PROB_FLOOR, 1.0 - PROB_FLOOR)
        return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)


def sentiment_class_log_probs(
    compound: torch.Tensor | Sequence[float],
    centres: Sequence[float] = SENTIMENT_CENTRES,
    width: float = SENTIMENT_WIDTH,
) -> torch.Tensor:
    """(N, 5) log p(c | s) from VADER compound scores x: log-softmax of −(x − μ_c)² / (2 w²) (module docstring)."""
    x = torch.as_tensor(compound, dtype=torch.float64).reshape(-1, 1)
    mu = torch.as_tensor(centres, dtype=torch.float64).reshape(1, -1)
    return torch.log_softmax(-((x - mu) ** 2) / (2.0 * width**2), dim=1)


class SentimentPotential(ClassifierPotential):
    """log p(c | s) for a review class c ∈ {1, …, 5} (1 = very negative, 5 = very positive) from VADER.

    See the module docstring for the mapping from VADER's compound score to the five classes.
    """

    classes = ("1", "2", "3", "4", "5")

    def __init__(self, target_class: int, width: float = SENTIMENT_WIDTH, include_prompt: bool = False):
        if isinstance(target_class, bool) or target_class not in (1, 2, 3, 4, 5):
            raise ConfigError(f"sentiment target_class must be one of 1..5, got {target_class!r}")
        if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
            raise ConfigError(f"sentiment width must be a positive number, got {width!r}")
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as exc:
            raise ModelLoadError("SentimentPotential needs `pip install vaderSentiment`") from exc
        self._analyzer = SentimentIntensityAnalyzer()
        self.target_class = int(target_class)
        self.label_index = self.target_class - 1
        self.width = float(width)
        self.include_prompt = include_prompt
        self.name = f"sentiment:{self.target_class}"

    def compound(self, texts: list[str]) -> list[float]:
        """VADER's compound score x ∈ [−1, 1] of each text."""
        return [float(self._analyzer.polarity_scores(t)["compound"]) for t in texts]

    def class_log_probs(self, texts: list[str]) -> torch.Tensor:
        return sentiment_class_log_probs(self.compound(texts), width=self.width)


# ----- CLI specs -----


def _toxicity_from_spec(arg: str | None) -> Potential:
    return ToxicityPotential(label=arg or "toxic")


def _sentiment_from_spec(arg: str | None) -> Potential:
    try:
        target_class = int(arg) if arg else None
    except ValueError:
        target_class = None
    if target_class is None:
        raise ConfigError(f"potential 'sentiment' needs a class 1..5: sentiment:1 … sentiment:5 (got {arg!r})")
    return SentimentPotential(target_class)


def _classifier_from_spec(arg: str | None) -> Potential:
    if not arg:
        raise ConfigError("potential 'classifier' needs a model: classifier:MODEL[:LABEL]")
    model, sep, label = arg.rpartition(":")
    if not sep or not model:
        model, label = arg, ""
    kwargs: dict[str, Any] = {"label": label} if label else {}
    return HFClassifierPotential(model, **kwargs)


register_potential("toxicity", _toxicity_from_spec)
register_potential("sentiment", _sentiment_from_spec)
register_potential("classifier", _classifier_from_spec)
