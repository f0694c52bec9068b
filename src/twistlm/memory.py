"""A sampler run's memory, estimated before any work so that a huge K or T fails with one line, not an OOM.

The estimate counts what grows with the number of rows N = B·K: a few (N, V) float32 buffers per step (log p0, the
proposal's probabilities, its float64 CDF, the twist's log ψ), the KV cache (layers × 2 × N × (prompt + T) ×
kv_heads × head_dim × dtype size, read from a Hugging Face config), a policy proposal's own KV cache and log-probs
(:func:`policy_bytes`) and the CPU bookkeeping (tokens (N, T)). It is a lower bound of the true peak: a run it refuses
could not have fitted.
"""

from __future__ import annotations

import os

import torch

from twistlm.errors import ConfigError

BASE_VOCAB_BUFFERS = 4
"""(N, V) float32-sized buffers alive at once with the base proposal: log p0, probabilities, the CDF (float64 = 2)."""

PROPOSAL_VOCAB_BUFFERS = 2
"""Extra (N, V) buffers of a proposal that reweights p0: log ψ and the proposal's logits."""

ROW_BOOKKEEPING_BYTES = 64
"""Per-row vectors of the sampler (weights, flags, log φ, ...), beyond the (N, T) token matrix."""


def kv_cache_bytes(lm, num_rows: int, seq_len: int) -> int:
    """KV cache of ``num_rows`` sequences of ``seq_len`` tokens (0 for a model without a Hugging Face config)."""
    model = getattr(lm, "model", None)
    cfg = getattr(model, "config", None)
    if cfg is None:
        return 0
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(cfg, "head_dim", None) or (int(cfg.hidden_size) // heads if heads else 0)
    dtype = getattr(model, "dtype", None)
    size = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
    return layers * 2 * num_rows * seq_len * kv_heads * int(head_dim) * size


def sampler_bytes(lm, num_rows: int, seq_len: int, new_tokens: int, vocab_buffers: int) -> tuple[int, int]:
    """(bytes where the model lives, bytes on the CPU) of a run over ``num_rows`` rows (Python ints: never
    overflows)."""
    device = num_rows * int(lm.vocab_size) * 4 * vocab_buffers + num_rows * int(lm.hidden_size) * 4
    device += kv_cache_bytes(lm, num_rows, seq_len)
    host = num_rows * (8 * new_tokens + ROW_BOOKKEEPING_BYTES)
    return device, host


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory of ``device``: CUDA's free bytes, else available RAM (psutil, /proc/meminfo, then sysconf)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no driver answer: do not guess  # noqa: BLE001
            return None
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: int) -> str:
    """1.5 GiB, 3.2e+05 GiB; a number too large for a float as a power of ten."""
    if n.bit_length() > 1000:
        return f"about 10^{int(n.bit_length() * 0.30103)} bytes"
    gib = n / 2**30
    return f"{gib:.1f} GiB" if gib < 1e5 else f"{gib:.2g} GiB"


def policy_bytes(policy_lm, num_rows: int, seq_len: int) -> int:
    """What a policy proposal adds (counted where the target's model lives): its KV cache, its (N, V) log-probs and
    its (N, H) hidden states."""
    per_row = (int(policy_lm.vocab_size) + int(policy_lm.hidden_size)) * 4
    return num_rows * per_row + kv_cache_bytes(policy_lm, num_rows, seq_len)


def check_sampler_memory(
    lm, num_rows: int, seq_len: int, new_tokens: int, vocab_buffers: int, extra_device_bytes: int = 0
) -> None:
    """Refuse a run whose estimated memory (plus ``extra_device_bytes`` where the model lives) exceeds what its
    device (or the CPU) has free."""
    device_bytes, host_bytes = sampler_bytes(lm, num_rows, seq_len, new_tokens, vocab_buffers)
    device_bytes += extra_device_bytes
    dev = torch.device(lm.device)
    needs = [(dev, device_bytes)] if dev.type == "cpu" else [(dev, device_bytes), (torch.device("cpu"), 0)]
    needs[-1] = (needs[-1][0], needs[-1][1] + host_bytes)
    for where, need in needs:
        limit = available_bytes(where)
        if limit is not None and need > limit:
            label = "RAM" if where.type == "cpu" else f"free memory on {where}"
            raise ConfigError(
                f"{num_rows} particles × {seq_len} tokens need about {format_bytes(need)} but only "
                f"{format_bytes(limit)} of {label} is available: lower the number of particles (-K) or the horizon (-T)"
            )
