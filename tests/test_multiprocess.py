"""Multi-process training on the CPU (gloo) through ``torchrun``, the launcher the README documents: ranks draw
disjoint samples, and a run killed after a checkpoint and resumed equals the uninterrupted 2-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")

SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, {here!r})
import torch
from test_training import _kill_resume_setup
from twistlm.training import TwistTrainer

class Record:
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and {record!r}:
            rank = int(os.environ["RANK"])
            with open(os.path.join({record!r}, f"rank{{rank}}.json"), "w") as f:
                json.dump(trainer.last_texts, f)

class Kill:
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

twist, target, cfg = _kill_resume_setup({out!r}, resume={resume}, max_steps=8)
trainer = TwistTrainer(twist, target, cfg, callbacks=[Record(), Kill()])
real = trainer._negatives
def negatives():
    samples, results = real()
    trainer.last_texts = [t for r in results for t in r.texts]
    return samples, results
trainer._negatives = negatives
trainer.train()
if trainer.accelerator.is_main_process:
    torch.save([p.detach() for p in twist.parameters()], os.path.join({out!r}, "final.pt"))
"""


def _launch(tmp: Path, out: Path, resume: bool, kill_at: int = -1, record: str = "") -> subprocess.CompletedProcess:
    script = tmp / f"run_{out.name}_{int(resume)}.py"
    script.write_text(SCRIPT.format(here=str(HERE), out=str(out), resume=resume, kill_at=kill_at, record=record))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), str(script)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this Python")
def test_two_process_run_is_disjoint_and_resumes_exactly(tmp_path):
    import torch

    record = tmp_path / "record"
    record.mkdir()
    straight = tmp_path / "straight"
    proc = _launch(tmp_path, straight, resume=False, record=str(record))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((record / "rank0.json").read_text())
    r1 = json.loads((record / "rank1.json").read_text())
    assert r0 != r1  # each rank samples with its own seed offset
    killed = tmp_path / "killed"
    proc = _launch(tmp_path, killed, resume=False, kill_at=4)
    assert proc.returncode != 0
    assert (killed / "checkpoint-4" / "rng_state_1.safetensors").is_file()  # every rank's RNG state
    proc = _launch(tmp_path, killed, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(straight / "final.pt")
    b = torch.load(killed / "final.pt")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    hist_a = json.loads((straight / "log_history.json").read_text())
    hist_b = json.loads((killed / "log_history.json").read_text())
    assert hist_a == hist_b
    shutil.rmtree(record)


CORPUS_SCRIPT = """
import os, sys
sys.path.insert(0, {here!r})
from test_corpus import _config
from test_training import SoftLetter
import twistlm
from twistlm import Target
from twistlm.corpus_training import CorpusTwistTrainer
from twistlm.twists.tabular import TabularTwist

lm = twistlm.ToyLM(vocab_size=5, seed=1)
target = Target(lm, prompts=["a", "b"], potential=SoftLetter(), max_new_tokens=3, extras={{"label": [0, 1]}})
drawn = []
cfg = _config({out!r}, steps=2, corpus_size=512)
trainer = CorpusTwistTrainer(TabularTwist.for_target(target), target, cfg,
                             progress=lambda done, total: drawn.append(done))
trainer.train()
with open(os.path.join({out!r}, "rank" + os.environ["RANK"] + ".txt"), "w") as f:
    f.write(str(len(drawn)) + " " + str(trainer.corpus.num_rows))
"""


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this Python")
def test_two_processes_draw_one_corpus_side_by_side(tmp_path):
    """Each rank draws one of the corpus's two chunks; both train on the whole corpus, the one a single process
    draws."""
    import torch

    from twistlm.corpus import build_corpus, load_corpus

    out = tmp_path / "run"
    script = tmp_path / "corpus_run.py"
    script.write_text(CORPUS_SCRIPT.format(here=str(HERE), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(29600 + os.getpid() % 1000), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "rank0.txt").read_text() == (out / "rank1.txt").read_text() == "1 1024"  # one chunk each, all rows
    sys.path.insert(0, str(HERE))
    from test_training import SoftLetter

    import twistlm

    lm = twistlm.ToyLM(vocab_size=5, seed=1)
    target = twistlm.Target(lm, prompts=["a", "b"], potential=SoftLetter(), max_new_tokens=3, extras={"label": [0, 1]})
    alone = build_corpus(target, tmp_path / "alone", 512, seed=3)
    shared = load_corpus(out / "corpus", target)
    assert all(torch.equal(getattr(alone, k), getattr(shared, k)) for k in ("tokens", "log_phi", "hidden"))
