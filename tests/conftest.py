"""Shared fixtures: the toy LM, the embedded model (loaded once per session), the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (first use converts the GGUF, ~20 s; later loads are cached)."""
    import twistlm

    return twistlm.load_lm()


@pytest.fixture(scope="module")
def tiny_hf():
    """A 2-layer random Llama over test_training's CharTokenizer alphabet: an HF model small enough for exact tests
    (one per test module)."""
    import torch
    from test_training import CharTokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    import twistlm

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, eos_token_id=0,
                         bos_token_id=1)
    return twistlm.HFLM(LlamaForCausalLM(config), CharTokenizer(), name="tiny-llama")


@pytest.fixture
def toy():
    import twistlm

    return twistlm.ToyLM(vocab_size=5, hidden_size=8, seed=1)


@pytest.fixture
def one_thread():
    """One intra-op torch thread during a test (restored afterwards): the toy problems and K = 4 runs gain nothing
    from threads, and on a busy 2-core machine oversubscribed threads made such runs 20-100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
