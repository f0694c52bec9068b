"""Twisted SMC with the chat template at T = 256 vs HF ``generate``: tokens per second (issue 13's performance item).

On the embedded model, the first Q dev questions of a GSM8K file (``part=dev``: the last 500 rows), each rendered
with the task's chat template and the GRPO recipe's system prompt, K samples per question, T new tokens:

* generate   HF ``model.generate`` on the Q prompts each repeated K times (left padding, ``do_sample``, ``top_k=0``,
             ``max_new_tokens=T``, stopping at EOS): every row prefills its prompt, Q·K prefills;
* smc        ``twistlm.smc`` with the base proposal and the task's potential (adaptive resampling, κ = 0.5), the Q
             prompts in one call: one prefill per question, its KV cache shared by the K particles;
* twisted    twisted SMC with the recipe's twist head (low-rank embedding head, width 128, depth 1, rank 64; fresh
             weights: speed does not depend on training), same resampling.

Methods are interleaved within each repetition after one warm-up run of each. Reported per method: generated tokens
(the returned sequences up to and including EOS: what a user gets), seconds, tokens per second, and the paired ratio
of tokens/s to generate's within each repetition (median over repetitions). Prefill work is reported too: prompt
tokens computed (generate: Q·K·prompt; SMC: Q·prompt).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gsm8k_speed.py --data ../shared/data/gsm8k/train.jsonl \\
        --questions 4 -K 8 --tokens 256 --repeats 3 --json gsm8k_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

RECIPE_HEAD = {"width": 128, "depth": 1, "rank": 64}
"""The twist head of ``train-twist``'s corpus recipe (twistlm.recipes)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a GSM8K JSONL file (its dev part is used)")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("-K", "--particles", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256, help="T, new tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from twistlm.cli.common import load_model
    from twistlm.smc import run_smc
    from twistlm.tasks import get_task
    from twistlm.twists.embedding import EmbeddingTwist

    torch.set_num_threads(args.threads)
    lm = load_model(None)
    Q, K, T = args.questions, args.particles, args.tokens
    target = get_task("gsm8k").build(lm, max_new_tokens=T, num_prompts=Q, data=args.data, part="dev")
    twist = EmbeddingTwist.for_lm(lm, seed=0, **RECIPE_HEAD)
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else lm.eos_token_id
    prompts = [list(p) for p in target.prompt_ids]
    width = max(len(p) for p in prompts)
    rows = [p for p in prompts for _ in range(K)]
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])

    def generated_length(seq: list[int]) -> int:
        return next((i + 1 for i, t in enumerate(seq) if t == lm.eos_token_id), len(seq))

    def run_generate(seed: int) -> tuple[int, float]:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = lm.model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, top_k=0,
                                    top_p=1.0, temperature=1.0, max_new_tokens=T, pad_token_id=pad,
                                    eos_token_id=lm.eos_token_id)
        seconds = time.perf_counter() - t0
        return sum(generated_length(r) for r in out[:, width:].tolist()), seconds

    def run_sampler(twisted: bool):
        def run(seed: int) -> tuple[int, float]:
            kw = {"proposal": "twisted", "twist": twist} if twisted else {}
            t0 = time.perf_counter()
            results = run_smc(target, K, ess_threshold=0.5, seed=seed, **kw)
            seconds = time.perf_counter() - t0
            return sum(generated_length(list(s)) for r in results for s in r.token_ids), seconds
        return run

    methods = {"generate": run_generate, "smc": run_sampler(False), "twisted": run_sampler(True)}
    for fn in methods.values():  # warm-up
        fn(0)
    runs = {name: [] for name in methods}
    for r in range(args.repeats):
        for name, fn in methods.items():
            runs[name].append(fn(1 + r))
    prompt_tokens = sum(len(p) for p in prompts)
    out = {"Q": Q, "K": K, "T": T, "repeats": args.repeats, "threads": args.threads,
           "prefill_tokens": {"generate": prompt_tokens * K, "smc": prompt_tokens, "twisted": prompt_tokens},
           "rows": {}}
    print(f"Q = {Q} dev questions, K = {K}, T = {T}, mean prompt {prompt_tokens / Q:.0f} tokens, "
          f"{args.repeats} repetitions")
    print(f"{'method':>9} | {'tokens':>7} | {'seconds':>8} | {'tokens/s':>8} | {'tokens/s vs generate (paired)':>30}")
    for name, rs in runs.items():
        rates = [n / s for n, s in rs]
        paired = [rate / (g[0] / g[1]) for rate, g in zip(rates, runs["generate"])]
        row = {"tokens": statistics.median(n for n, _ in rs), "seconds": statistics.median(s for _, s in rs),
               "tokens_per_s": statistics.median(rates), "paired_ratio": statistics.median(paired),
               "paired_min": min(paired), "paired_max": max(paired), "runs": rs}
        out["rows"][name] = row
        print(f"{name:>9} | {row['tokens']:7.0f} | {row['seconds']:8.1f} | {row['tokens_per_s']:8.1f} | "
              f"{row['paired_ratio']:6.3f}× ({row['paired_min']:.3f}–{row['paired_max']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
