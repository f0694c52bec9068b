"""Classification by a language model's verbalized labels, and its few-label baselines.

A :class:`LabelFormat` turns an input text x into a prompt and names one verbalizer v_l per label l; the context c is
the prompt's tokens (as the model encodes a prompt) followed by those of an optional rationale z. The classifier's probability of label l is the LM's probability of v_l, normalised over labels:

    p_θ(l | c) = p_θ(v_l | c) / Σ_m p_θ(v_m | c),     p_θ(v | c) = Π_j p_θ(v_j | c, v_<j).

The methods (registry :data:`METHODS`), each fitted on a handful of labelled examples:

* ``zero-shot`` — the base model p0 as it is (the labelled examples are not used);
* ``few-shot`` — p0 with the labelled examples written before the context as demonstrations (``demo`` of the
  format; all of them, in a seeded order);
* ``lora-sft`` — a LoRA adapter trained on the labelled examples alone by cross-entropy of p_θ(l | c) (the
  supervised baseline; also the M-step classifier p_θ(y | x, z) of latent-rationale EM when the contexts carry
  sampled rationales);
* ``latent-em`` — that classifier reading a rationale z the base model writes, trained by EM and marginalising z
  (:mod:`twistlm.latent_em`).

Accuracy comes with a 95% Wilson interval (:func:`accuracy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.solve import wilson_interval


class LabelFormat(Protocol):
    """How a task writes a classification problem for the LM."""

    label_names: Sequence[str]
    """Label l's name; labels are 0 … L − 1."""

    def prompt(self, text: str) -> str:
        """The prompt for input ``text`` (a rationale, if any, follows it)."""

    def verbalizer(self, label: int) -> str:
        """v_l: the text whose probability after the context scores label l."""

    def demo(self, text: str, label: int) -> str:
        """A labelled demonstration (prompt + its verbalizer + a separator) for few-shot prompting."""

    max_rationale_tokens: int
    """Longest rationale z (``latent-em`` only)."""

    def rationale_stop_ids(self, lm: ParticleLM) -> Sequence[int]:
        """Tokens that end a rationale besides EOS (``latent-em`` only)."""


@dataclass(frozen=True)
class Labelled:
    text: str
    label: int
    rationale: str = ""


def context_ids(lm: ParticleLM, fmt: LabelFormat, text: str, rationale: str = "", prefix: str = "") -> list[int]:
    """c = encode(prefix + prompt(x)) + ids(z)."""
    ids = list(lm.encode(prefix + fmt.prompt(text)))
    return ids + list(lm.tokenize(rationale)) if rationale else ids


def verbalizer_ids(lm: ParticleLM, fmt: LabelFormat) -> list[list[int]]:
    return [list(lm.tokenize(fmt.verbalizer(l))) for l in range(len(fmt.label_names))]


def label_log_probs(lm: ParticleLM, contexts: Sequence[Sequence[int]], verbalizers: Sequence[Sequence[int]],
                    batch_size: int = 16) -> torch.Tensor:
    """(N, L) log p_θ(l | c_i) (module docstring); differentiable when grad is enabled (one pass per batch)."""
    from twistlm.gfn.scoring import gather_logprobs, prefix_pass

    L = len(verbalizers)
    if L < 2 or any(len(v) == 0 for v in verbalizers):
        raise ConfigError("a classifier needs at least two labels, each with a non-empty verbalizer")
    out = []
    for k in range(0, len(contexts), batch_size):
        chunk = [list(c) for c in contexts[k : k + batch_size]]
        rows = [i for i in range(len(chunk)) for _ in range(L)]
        seqs = [list(verbalizers[l]) for _ in chunk for l in range(L)]
        ppass = prefix_pass(lm, chunk, rows, seqs)
        r = torch.tensor([n for n, s in enumerate(seqs) for _ in s])
        c = torch.tensor([j for s in seqs for j in range(len(s))])
        y = torch.tensor([t for s in seqs for t in s])
        tok = gather_logprobs(lm, ppass, r, c, y)
        seq_lp = torch.zeros(len(seqs), dtype=tok.dtype).index_add(0, r, tok)
        out.append(torch.log_softmax(seq_lp.view(len(chunk), L).double(), dim=1))
    return torch.cat(out) if out else torch.zeros(0, L, dtype=torch.float64)


class Classifier:
    """A fitted method: an LM (maybe with an adapter) and a prefix written before every context."""

    def __init__(self, lm: ParticleLM, fmt: LabelFormat, prefix: str = ""):
        self.lm, self.fmt, self.prefix = lm, fmt, prefix

    def log_probs(self, texts: Sequence[str], rationales: Sequence[str] | None = None,
                  batch_size: int = 16) -> torch.Tensor:
        """(N, L) log p(l | x_i, z_i), no grad."""
        rationales = rationales if rationales is not None else [""] * len(texts)
        contexts = [context_ids(self.lm, self.fmt, t, z, self.prefix) for t, z in zip(texts, rationales)]
        with torch.no_grad():
            return label_log_probs(self.lm, contexts, verbalizer_ids(self.lm, self.fmt), batch_size)

    def predict(self, texts: Sequence[str], rationales: Sequence[str] | None = None) -> list[int]:
        return self.log_probs(texts, rationales).argmax(dim=1).tolist()


@dataclass
class SFTSettings:
    """LoRA SFT of the label classifier: rank, learning rate, epochs over the labelled set, batch size.

    lr 1e-3 was chosen on a tuning split (SUBJ train.jsonl rows 4000–4199, 50 labels): 0.864 accuracy against
    0.722 at 3e-4 (EXPERIMENTS.md)."""

    r: int = 8
    alpha: int = 16
    learning_rate: float = 1e-3
    epochs: int = 10
    batch_size: int = 8

    def attach(self, lm: ParticleLM, generator: torch.Generator) -> ParticleLM:
        """``lm`` with a fresh LoRA adapter of this rank injected (in place; a Hugging Face model only), its
        initialisation drawn from ``generator`` (so a run's ``--seed`` fixes the fitted classifier)."""
        from twistlm.gfn.policy import LoraSettings, attach_lora

        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return attach_lora(lm, LoraSettings(r=self.r, alpha=self.alpha).peft_config(), seed=seed)


def _zero_shot(lm, fmt, labelled, generator, settings, sampler=None) -> Classifier:
    return Classifier(lm, fmt)


def _few_shot(lm, fmt, labelled, generator, settings, sampler=None) -> Classifier:
    order = torch.randperm(len(labelled), generator=generator).tolist()
    return Classifier(lm, fmt, "".join(fmt.demo(labelled[i].text, labelled[i].label) for i in order))


def fit_lora_classifier(lm: ParticleLM, fmt: LabelFormat, labelled: Sequence[Labelled], generator: torch.Generator,
                        settings: SFTSettings | None = None, on_epoch: Callable[[int, float], None] | None = None
                        ) -> Classifier:
    """Attach a LoRA adapter to ``lm`` (in place) and train it by cross-entropy of p_θ(y | x, z) on ``labelled``."""
    s = settings or SFTSettings()
    if not labelled:
        raise ConfigError("lora-sft needs at least one labelled example")
    lm = s.attach(lm, generator)
    train_classifier(lm, fmt, labelled, generator, s, on_epoch)
    return Classifier(lm, fmt)


def train_classifier(lm: ParticleLM, fmt: LabelFormat, labelled: Sequence[Labelled], generator: torch.Generator,
                     settings: SFTSettings, on_epoch: Callable[[int, float], None] | None = None) -> None:
    """``settings.epochs`` passes of AdamW over ``labelled`` (seeded order) on the adapter already in ``lm``."""
    from twistlm.gfn.policy import peft_model_of

    s = settings
    model = peft_model_of(lm)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
    contexts = [context_ids(lm, fmt, e.text, e.rationale) for e in labelled]
    verbs = verbalizer_ids(lm, fmt)
    labels = torch.tensor([e.label for e in labelled])
    model.train()
    for epoch in range(s.epochs):
        order = torch.randperm(len(labelled), generator=generator)
        total = 0.0
        for k in range(0, len(order), s.batch_size):
            idx = order[k : k + s.batch_size]
            lp = label_log_probs(lm, [contexts[i] for i in idx], verbs, batch_size=len(idx))
            loss = -lp.gather(1, labels[idx, None]).mean()
            if not torch.isfinite(loss):
                raise ConfigError(f"the classifier's loss is {float(loss)} in epoch {epoch + 1}; lower learning_rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if on_epoch is not None:
            on_epoch(epoch + 1, total / len(labelled))
    model.eval()


def _lora_sft(lm, fmt, labelled, generator, settings, sampler=None) -> Classifier:
    return fit_lora_classifier(lm, fmt, labelled, generator, settings)


def _latent_em(lm, fmt, labelled, generator, settings, sampler=None) -> Classifier:
    from twistlm.latent_em import EMSettings, fit_latent_em

    return fit_latent_em(lm, fmt, labelled, generator, EMSettings(sft=settings or SFTSettings()), sampler=sampler)


METHODS: dict[str, Callable[..., Classifier]] = {
    "zero-shot": _zero_shot,
    "few-shot": _few_shot,
    "lora-sft": _lora_sft,
    "latent-em": _latent_em,
}
"""Registry: method name → fit(lm, fmt, labelled, generator, settings, sampler=None) -> Classifier (``sampler``: where
latent-em draws its rationales, E-step and prediction, :class:`twistlm.latent_em.PolicyRationales`; None: p0; the
others draw no rationales and ignore it). ``lora-sft`` and
``latent-em`` (:mod:`twistlm.latent_em`: the classifier through sampled rationales, trained by EM) change ``lm``
(they attach an adapter): give each its own copy of the model."""
ADAPTER_METHODS = ("lora-sft", "latent-em")


def fit(method: str, lm: ParticleLM, fmt: LabelFormat, labelled: Sequence[Labelled], seed: int = 0,
        settings: SFTSettings | None = None, sampler=None) -> Classifier:
    if method not in METHODS:
        raise ConfigError(f"unknown classifier method {method!r}; choose from: {', '.join(METHODS)}")
    return METHODS[method](lm, fmt, list(labelled), torch.Generator().manual_seed(seed), settings, sampler=sampler)


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson score interval."""
        return wilson_interval(self.value, self.total) if self.total else (float("nan"), float("nan"))

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.interval
        return {"accuracy": self.value, "ci_low": lo, "ci_high": hi, "correct": self.correct, "total": self.total}


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> Accuracy:
    if len(predicted) != len(gold):
        raise ConfigError(f"{len(predicted)} predictions for {len(gold)} labels")
    return Accuracy(sum(int(p == g) for p, g in zip(predicted, gold)), len(gold))
