"""Size and headless render time of the HTML run page (issue 14) for a large run: K = 256 particles, T = 64 steps.

A twisted SMC run with a linear twist (so log ψ is embedded too) on the toy LM (default: 26 letters + EOS, EOS
suppressed so every particle runs all T steps) or on the embedded SmolLM2-135M (``--model embedded``: a real
tokenizer, so a larger token table; sampling takes minutes on CPU). The page is written with ``to_html``, then
opened ``--repeats`` times in headless Chromium without network (:mod:`twistlm.html.browser`). Reported: the page
size, the page script's own render time (navigation start → everything drawn, read from ``#render-ms``) and the wall
time of the whole browser process (start-up included). Budget: under 5 MB, rendered in a few seconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/html_size.py
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/html_size.py --model embedded --json /tmp/html_size.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import twistlm
from twistlm import LinearTwist, SMCTrace, Target, ToyLM
from twistlm.html import browser

SIZE_BUDGET_BYTES = 5 * 2**20
RENDER_BUDGET_S = 5.0
TOY_VOCAB = 27
TOY_HIDDEN = 16
TOY_EOS_BIAS = -20.0
"""Keeps the toy LM's EOS out of reach, so the run lasts all T steps (the worst case for the page)."""
PROMPT = "Once upon a time"


def _run(model: str, K: int, T: int, seed: int):
    if model == "toy":
        lm = ToyLM(vocab_size=TOY_VOCAB, hidden_size=TOY_HIDDEN, seed=3, eos_bias=TOY_EOS_BIAS)
        prompt = "ab"
    else:
        lm = twistlm.load_lm()
        prompt = PROMPT
    target = Target(lm, prompt=prompt, potential=lambda texts: [-0.05 * len(t) for t in texts], max_new_tokens=T)
    twist = LinearTwist.for_lm(lm, init_scale=0.1, seed=2)
    if model == "toy":
        twist = twist.double()
    trace = SMCTrace(lm)
    start = time.perf_counter()
    res = twistlm.twisted_smc(target, twist, K, seed=seed, callback=trace)
    return res, trace, time.perf_counter() - start, lm.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("toy", "embedded"), default="toy")
    ap.add_argument("-K", "--particles", type=int, default=256)
    ap.add_argument("-T", "--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="Keep the page here (default: a temporary folder).")
    ap.add_argument("--json", type=Path, help="Write the numbers here.")
    args = ap.parse_args(argv)

    res, trace, sample_s, model_name = _run(args.model, args.particles, args.tokens, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "run.html"
        start = time.perf_counter()
        res.to_html(path, trace=trace, settings={"model": model_name, "proposal": "twisted", "seed": args.seed})
        write_s = time.perf_counter() - start
        size = path.stat().st_size
        renders, walls, startup = [], [], None
        if browser.find_chromium() is None:
            print("no Chromium found: size only", file=sys.stderr)
        else:
            blank = Path(tmp) / "blank.html"
            blank.write_text("<!DOCTYPE html><title>blank</title>", encoding="utf-8")
            startup = browser.render(blank).seconds
            for _ in range(args.repeats):
                shown = browser.render(path)
                if shown.element_text("render-status") != "ok" or shown.console:
                    print(f"render failed: {shown.element_text('twistlm-errors')} {shown.console}", file=sys.stderr)
                    return 1
                renders.append(float(shown.element_text("render-ms")) / 1000)
                walls.append(shown.seconds)
    out = {
        "model": model_name, "K": args.particles, "T": args.tokens, "steps": len(res.ess),
        "sampling_s": sample_s, "write_s": write_s, "page_bytes": size,
        "render_s_median": statistics.median(renders) if renders else None,
        "browser_wall_s_median": statistics.median(walls) if walls else None,
        "renders_s": renders, "browser_wall_s": walls, "browser_blank_page_s": startup,
    }  # fmt: skip
    print(f"model {model_name}, K={args.particles}, T={args.tokens} ({out['steps']} steps run)")
    print(f"page       {size / 2**20:.2f} MB  (budget {SIZE_BUDGET_BYTES / 2**20:.0f} MB)  written in {write_s:.2f} s")
    if renders:
        print(f"render     {out['render_s_median']:.2f} s in-page (median of {len(renders)}), "
              f"browser process {out['browser_wall_s_median']:.2f} s wall (a blank page: {startup:.2f} s)")
    ok = size < SIZE_BUDGET_BYTES and (not walls or out["browser_wall_s_median"] < RENDER_BUDGET_S)
    print("PASS" if ok else "FAIL")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
