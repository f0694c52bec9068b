"""``twistlm classify``: few-label classification of SUBJ sentences by the task's own judgment, p0(y | x, z).

Flow: cheap checks (numbers, methods, files, output path) → the labelled examples (``--labelled``) and the scored
rows (``--data`` from ``--index``, ``--limit`` of them, skipping any sentence that is also labelled), written in the
task's ``--form`` (:data:`twistlm.tasks.subjectivity.FORMS`; a policy must have been trained in it) → load the model
→ fit each method (:data:`twistlm.classify.METHODS`; ``lora-sft`` and ``latent-em`` each on its own copy of the
model; ``--policy``: latent-em draws its rationales from a GFlowNet policy, on a third copy) → accuracy with 95%
Wilson intervals → optionally ``--json OUT`` (atomic) with every prediction.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from twistlm.cli.app import app, console, loading_status
from twistlm.cli.common import (
    EMBEDDED_LABEL,
    check_model,
    check_policies,
    check_writable,
    load_model,
    load_policy_lm,
    method_names,
    write_json,
)
from twistlm.errors import ConfigError

DEFAULT_METHODS = "zero-shot,few-shot,lora-sft"
DEFAULT_LIMIT = 500


@app.command("classify")
def classify_command(
    labelled: Annotated[Path, typer.Option("--labelled", help="SUBJ JSONL of labelled examples (e.g. subj/train.50.jsonl).")],
    data: Annotated[Path, typer.Option("--data", help="SUBJ JSONL to score (e.g. subj/train.jsonl).")],
    index: Annotated[int, typer.Option("--index", help="First row of --data scored.")] = 0,
    limit: Annotated[int, typer.Option("--limit", help="Rows scored (labelled sentences are skipped).")] = DEFAULT_LIMIT,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: zero-shot, few-shot, lora-sft, latent-em.")] = DEFAULT_METHODS,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs of LoRA SFT (lora-sft, latent-em's M-step; default: SFTSettings').")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="LoRA SFT learning rate (lora-sft, latent-em).")] = None,
    form: Annotated[str, typer.Option("--form", help="How the task writes a rationale: sentence or short (the GFlowNet paper's SUBJ format).")] = "sentence",
    policy: Annotated[Path | None, typer.Option("--policy", help="latent-em's rationale sampler (E-step proposal and prediction): a train-gfn --task subjectivity policy (default: p0).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Hub id, model directory or .gguf file.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (demonstration order, SFT batches).")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every prediction here.")] = None,
) -> None:
    """Classify SUBJ sentences with zero-shot, few-shot, LoRA-SFT or latent-rationale EM classifiers fitted on a few
    labelled examples (latent-em is not in the default --methods: it samples rationales, 20–40 min for 50 labels here)."""
    from dataclasses import asdict, replace

    from twistlm.classify import ADAPTER_METHODS, Labelled, SFTSettings, accuracy, fit
    from twistlm.data import load_subj
    from twistlm.tasks.subjectivity import LABEL_FORMATS

    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if index < 0:
        raise ConfigError(f"--index must be ≥ 0, got {index}")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    if learning_rate is not None and not learning_rate > 0:
        raise ConfigError(f"--lr must be positive, got {learning_rate}")
    from twistlm.classify import METHODS

    if form not in LABEL_FORMATS:
        raise ConfigError(f"--form {form!r}: choose from {', '.join(LABEL_FORMATS)}")
    names = method_names(methods, METHODS, "classifier method")
    if not names:
        raise ConfigError("--methods is empty")
    for flag, path in (("--labelled", labelled), ("--data", data)):
        if not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    if policy is not None:
        if "latent-em" not in names:
            raise ConfigError("--policy is latent-em's rationale sampler: add latent-em to --methods")
        check_policies([policy], "subjectivity", {"form": form}, model, {"form": "--form"})
    if json_out is not None:
        check_writable(json_out)
    train = [Labelled(e.text, e.label) for e in load_subj(labelled)]
    seen = {e.text for e in train}
    pool = load_subj(data)
    if index + limit > len(pool):
        raise ConfigError(f"--index {index} + --limit {limit} exceeds the {len(pool)} rows of {data}")
    rows = [e for e in pool[index : index + limit] if e.text not in seen]
    if not rows:
        raise ConfigError("every scored row is also a labelled example")
    settings = SFTSettings()
    settings = replace(settings, **{k: v for k, v in (("epochs", epochs), ("learning_rate", learning_rate)) if v is not None})
    check_model(model)

    with loading_status(model or EMBEDDED_LABEL, False):
        lm = load_model(model)
    sampler = None
    if policy is not None:
        from twistlm.gfn.policy import load_action_space
        from twistlm.latent_em import PolicyRationales

        sampler = PolicyRationales(load_policy_lm(policy, model, lm, "subjectivity"), load_action_space(policy.expanduser()))
    texts, gold = [e.text for e in rows], [e.label for e in rows]
    table = Table(title=f"SUBJ rows {index}–{index + limit - 1} of {data.name} ({len(rows)} scored; "
                        f"{len(train)} labelled from {labelled.name}; seed {seed})",
                  title_justify="left", title_style="bold", caption="95% Wilson intervals", caption_justify="left")
    for col in ("method", "accuracy", "says subjective", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    out = {}
    for name in names:
        start = time.perf_counter()
        own = load_model(model) if name in ADAPTER_METHODS else lm  # the adapter goes into the model it is fitted on
        classifier = fit(name, own, LABEL_FORMATS[form], train, seed=seed, settings=settings, sampler=sampler)
        pred = classifier.predict(texts)
        acc, seconds = accuracy(pred, gold), time.perf_counter() - start
        lo, hi = acc.interval
        table.add_row(name, f"{acc.value:.3f} [{lo:.3f}–{hi:.3f}]", f"{sum(pred) / len(pred):.2f}", f"{seconds:.0f}")
        out[name] = {**acc.to_dict(), "seconds": seconds, "predictions": pred}
        for r in getattr(classifier, "rounds", []):  # latent-em: how much each E-step's weights selected
            console.print(f"{name} round {r['round']}: E-step ESS {r['ess_fraction']:.0%} of the draws, "
                          f"M-step loss {r['loss']:.3f}", style="dim", highlight=False)
            out[name].setdefault("rounds", []).append(r)
    console.print(table)
    if json_out is not None:
        write_json(json_out, {"settings": {"labelled": str(labelled), "data": str(data), "index": index,
                                           "limit": limit, "scored": len(rows), "seed": seed, "form": form,
                                           "model": model or EMBEDDED_LABEL, "sft": asdict(settings),
                                           "policy": None if policy is None else str(policy)},
                              "gold": gold, "methods": out})
        console.print(f"wrote {json_out}", style="dim", highlight=False)
