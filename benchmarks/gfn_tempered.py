"""Tempered continuation (σ ∝ p0^{1/τ}, τ = 0.5, one sentence): base log-likelihood vs diversity of samples from
temperature sampling, nucleus sampling, SMC on the tempered target and a GFlowNet policy, on held-out prompts.

Prompts: lines ``--first`` … ``--first + --prompts − 1`` of ``prompts/openwebtext.txt`` (the GFN policy is trained on
lines 0 … 63, see EXPERIMENTS.md). Per method, K samples per prompt; reported: mean log p0(s ⊤ | x) of the samples
(the stop token included), mean per-prompt diversity (1 − mean pairwise cosine of all-MiniLM-L6-v2 embeddings,
:mod:`twistlm.diversity`), the share of distinct samples, each with a 95% interval over prompts; and a PNG of the
likelihood/diversity plane.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gfn_tempered.py --policy runs/gfn-temp --json /tmp/temp.json \
        --plot docs/img/gfn_tempered.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

import twistlm
from twistlm.diversity import diversity
from twistlm.tasks.registry import get_task

DATA = "../shared/data/prompts/openwebtext.txt"
T_CRIT = 2.131  # Student t, 95%, 15 degrees of freedom (16 prompts)


def ci(values):
    m = statistics.mean(values)
    half = T_CRIT * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return m, half


def base_loglik(lm, prompt_ids, completions) -> list[float]:
    from twistlm.potentials.likelihood import score_continuations

    return score_continuations(lm, prompt_ids, completions).tolist()


def smc_samples(target, K, gen):
    results = twistlm.run_smc(target, K, resampler="systematic", ess_threshold=0.5, generator=gen)
    out = []
    for r in results:
        idx = torch.multinomial(r.normalized_weights.double(), K, replacement=True, generator=gen)
        out.append([r.token_ids[i] for i in idx.tolist()])
    return out


def tempered_samples(target, K, tau, gen):
    results = twistlm.run_smc(target, K, proposal="tempered", temperature=tau, ess_threshold=0.0, generator=gen)
    return [r.token_ids for r in results]


def nucleus_samples(lm, target, K, top_p, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    out = []
    for ids in target.prompt_ids:
        x = torch.tensor([ids])
        y = lm.model.generate(x, do_sample=True, top_p=top_p, top_k=0, temperature=1.0, num_return_sequences=K,
                              max_new_tokens=target.max_new_tokens, eos_token_id=list(target.stop_ids),
                              pad_token_id=lm.eos_token_id, attention_mask=torch.ones_like(x))
        rows = []
        for row in y[:, len(ids):].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in set(target.stop_ids)), len(row))
            rows.append(row[:cut])
        out.append(rows)
    return out


def policy_samples(policy_dir, lm, target, K, gen):
    from twistlm.gfn.policy import load_action_space, load_policy
    from twistlm.gfn.sampling import sample_trajectories

    pol = load_policy(lm, policy_dir, task="tempered")
    space = load_action_space(policy_dir)
    trajs = sample_trajectories(pol, target.prompt_ids, K, space, gen)
    out = [[] for _ in target.prompt_ids]
    for toks, stop, b in zip(trajs.tokens, trajs.stop_token, trajs.prompt_index):
        out[b].append(toks + ([stop] if stop >= 0 else []))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default=None)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--first", type=int, default=1000)
    ap.add_argument("-K", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--only-policy", action="store_true", help="evaluate the policy alone (no baselines)")
    args = ap.parse_args()
    lm = twistlm.load_lm()
    target = get_task("tempered").build(lm, num_prompts=args.prompts, data=DATA, index=args.first)
    plain = twistlm.Target(lm, prompts=target.prompts, max_new_tokens=target.max_new_tokens,
                           stop_token_ids=target.stop_token_ids)
    gen = torch.Generator().manual_seed(args.seed)
    methods = {
        "temperature 1.0 (p0)": lambda: tempered_samples(plain, args.K, 1.0, gen),
        "temperature 0.7": lambda: tempered_samples(plain, args.K, 0.7, gen),
        "temperature 0.5": lambda: tempered_samples(plain, args.K, 0.5, gen),
        "nucleus p=0.9": lambda: nucleus_samples(lm, plain, args.K, 0.9, gen),
        "nucleus p=0.95": lambda: nucleus_samples(lm, plain, args.K, 0.95, gen),
        f"SMC on σ, K={args.K}": lambda: smc_samples(target, args.K, gen),
    }
    if args.only_policy:
        methods = {}
    if args.policy:
        methods["GFlowNet policy"] = lambda: policy_samples(args.policy, lm, plain, args.K, gen)
    rows = {}
    for name, draw in methods.items():
        t = time.perf_counter()
        samples = draw()
        wall = time.perf_counter() - t
        lls, divs, distinct = [], [], []
        for b, group in enumerate(samples):
            # EOS-finished samples end without a stop token; score the EOS too, as the sampler's p0 does
            ends = [g if (g and g[-1] in set(target.stop_ids)) else g + [lm.eos_token_id] for g in group]
            ll = base_loglik(lm, target.prompt_ids[b], ends)
            lls.append(statistics.mean(ll))
            texts = [lm.decode(g) for g in group]
            divs.append(diversity(texts))
            distinct.append(len(set(map(tuple, group))) / len(group))
        rows[name] = {
            "log_p0": ci(lls),
            "diversity": ci(divs),
            "distinct": ci(distinct),
            "seconds": wall,
            "example": lm.decode(samples[0][0]),
        }
        print(name, {k: v for k, v in rows[name].items() if k != "example"}, flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "prompts": args.prompts, "first": args.first, "K": args.K,
              "tau": float(target.potential.tau), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
        for name, r in rows.items():
            ax.errorbar(r["diversity"][0], r["log_p0"][0], xerr=r["diversity"][1], yerr=r["log_p0"][1], fmt="o",
                        capsize=3, label=name)
        ax.set_xlabel("diversity (1 − mean pairwise cosine, MiniLM)")
        ax.set_ylabel("mean log p0(s ⊤ | x)")
        ax.set_title(f"tempered continuation τ = {report['tau']:g}: {args.prompts} held-out prompts × {args.K}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
