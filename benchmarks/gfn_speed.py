"""GFlowNet fine-tuning speed on the embedded model (arithmetic task, default recipe):

1. all-prefix rewards log R(z_1:m ⊤) for every state of a batch: twistlm's two batched passes
   (:mod:`twistlm.gfn.scoring`) against one forward per prefix (the reference implementation's way), side by side on
   the same batch, with the largest difference between the two;
2. one training update split into sampling, rewards (frozen base) and policy loss + backward + step; trajectories
   per second.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gfn_speed.py --repeats 3 --json /tmp/gfn_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import twistlm
from twistlm.gfn.config import GFNConfig
from twistlm.gfn.policy import LoRAPolicy, LoraSettings
from twistlm.gfn.problems import build_problem
from twistlm.gfn.rewards import reward_for
from twistlm.gfn.sampling import sample_trajectories
from twistlm.gfn.trainer import GFNTrainer
from twistlm.gfn.trajectories import state_index

DATA = "../shared/data/arithmetic/train_50.json"


def per_prefix_rewards(lm, target, trajs, states, stop) -> torch.Tensor:
    """log R at every state the reference's way: one forward per prefix (x z_1:m "." y scored from x z_1:m's cache),
    plus one pass per trajectory for the cumulative log p0 of its actions (tool tokens weigh 1)."""
    out = torch.zeros(len(trajs), max(len(s) for s in states), dtype=torch.float64)
    obs = target.extras["observation"]
    for i, st in enumerate(states):
        prompt = target.prompt_ids[trajs.prompt_index[i]]
        y = [stop] + lm.tokenize(obs[trajs.prompt_index[i]])
        toks, forced = trajs.tokens[i], trajs.forced[i]
        ctx = lm.prefill([prompt], 1)
        cum = [0.0]
        for t, f in zip(toks, forced):
            cum.append(cum[-1] + (0.0 if f else float(ctx.logprobs[0, t])))
            ctx = lm.step(ctx, torch.tensor([t]))
        for a, m in enumerate(st):
            state = lm.prefill([prompt + toks[:m]], 1)
            out[i, a] = cum[m] + float(lm.score_tokens(state, [y], [0])[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lm = twistlm.load_lm()
    problem = build_problem("arithmetic", lm, data=DATA)
    cfg = GFNConfig(output_dir="/tmp/gfn-speed", overwrite=True, replay_prob=0.0, tempered_prob=0.0, plot=False)
    policy = LoRAPolicy.create(lm, LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules))
    trainer = GFNTrainer(policy, problem, cfg)
    keys = [5, 100, 200, 300]
    sub = problem.target.select(keys)
    gen = torch.Generator().manual_seed(0)
    trajs = sample_trajectories(policy.lm, sub.prompt_ids, cfg.samples_per_prompt, problem.space, gen, tool=sub.tool)
    states, _, _ = state_index(trajs, 0)  # every state, as the all-prefix comparison asks
    reward = reward_for(sub, problem.space.stop_ids)
    stop = problem.space.stop_ids[0]
    fast_t, slow_t = [], []
    with torch.no_grad(), policy.base() as base:
        for _ in range(args.repeats):
            t = time.perf_counter()
            fast = reward(base, trajs, states)
            fast_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            slow = per_prefix_rewards(base, sub, trajs, states, stop)
            slow_t.append(time.perf_counter() - t)
    valid = fast > -100
    diff = float((fast - slow)[valid].abs().max())
    n_states = sum(len(s) for s in states)
    # one update, split
    split = {"sampling": [], "rewards": [], "loss_backward_step": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tr = sample_trajectories(policy.lm, sub.prompt_ids, cfg.samples_per_prompt, trainer.space, gen, tool=sub.tool)
        t1 = time.perf_counter()
        st, term, _ = state_index(tr, trainer.space.min_len, trainer.space.stop_after_tool)
        with torch.no_grad(), policy.base() as base:
            reward(base, tr, st, term)
        t2 = time.perf_counter()
        batch, _ = trainer.score(tr, sub)  # recomputes rewards too; subtract them below
        t3 = time.perf_counter()
        loss, terms = trainer.objective.compute(batch, lam=cfg.subtb_lambda)
        trainer.optimizer_step(loss, terms)
        t4 = time.perf_counter()
        split["sampling"].append(t1 - t0)
        split["rewards"].append(t2 - t1)
        split["loss_backward_step"].append((t3 - t2) - (t2 - t1) + (t4 - t3))
    per_update = {k: statistics.median(v) for k, v in split.items()}
    total = sum(per_update.values())
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "trajectories": len(trajs),
        "states": n_states,
        "batched_rewards_s": statistics.median(fast_t),
        "per_prefix_rewards_s": statistics.median(slow_t),
        "speedup": statistics.median(slow_t) / statistics.median(fast_t),
        "max_abs_difference": diff,
        "update_split_s": per_update,
        "update_s": total,
        "trajectories_per_s": cfg.prompts_per_step * cfg.samples_per_prompt / total,
    }
    print(json.dumps(report, indent=2))
    assert diff < 5e-3, f"batched and per-prefix rewards differ by {diff}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
