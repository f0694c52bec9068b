"""A policy as the SMC proposal (``proposal="policy"``, :mod:`twistlm.policy_proposal`): exact on the toy LM, whose
sequences are enumerated; the LoRA policy on SmolLM2 through the API and the CLI (``sample --proposal policy``,
``evaluate --policy``), and the refusals of a policy that does not fit (one line, exit code 2).

Unbiasedness tests batch R = 2000 independent runs as R groups of one call and require |mean Ẑ − Z| ≤ 4 standard
errors, as tests/test_smc_exact.py does.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from test_smc_exact import hard_potential, soft_potential
from test_tools import AfterAForceB
from test_tools import exact_log_z as tool_exact_log_z
from test_tools import potential as tool_potential

import twistlm
from twistlm.cli.app import USAGE_ERROR, run_app
from twistlm.errors import ConfigError, TwistLMError
from twistlm.exact import OptimalTwist, enumerate_target
from twistlm.gfn.sampling import ActionSpace
from twistlm.gfn.toy_policy import TabularPolicy
from twistlm.potentials import FunctionPotential
from twistlm.tasks.registry import TASKS, Task

RUNS = 2000
SE_TOLERANCE = 4.0
T = 4
PROMPT = "a"
POLICY_SCALE = 1.0
"""Spread of the random policy's logit offsets: far enough from p0 that its weights vary a lot."""
EXACT_ATOL = 1e-10


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def make_target(lm, potential, runs=1, prompt=PROMPT, horizon=T, **kwargs):
    return twistlm.Target(lm, prompts=[prompt] * runs, potential=potential, max_new_tokens=horizon, **kwargs)


def live_prefixes(lm, horizon):
    """Every generated prefix after which a particle is still unfinished (no EOS, shorter than T)."""
    letters = [v for v in range(lm.vocab_size) if v != lm.eos_token_id]
    for m in range(horizon):
        yield from itertools.product(letters, repeat=m)


def random_policy(lm, prompt=PROMPT, seed=0, scale=POLICY_SCALE) -> TabularPolicy:
    """A fixed random tabular policy: rows assigned to every live prefix up front, logit offsets ~ N(0, scale²)."""
    policy = TabularPolicy(lm)
    ids = tuple(lm.encode(prompt))
    for prefix in live_prefixes(lm, T):
        policy.row((ids, *prefix))
    with torch.no_grad():
        policy.table.normal_(0.0, scale, generator=torch.Generator().manual_seed(seed))
    return policy


def exact_policy(lm, exact, prompt=PROMPT) -> TabularPolicy:
    """q(v | s) = σ(v | s) = p0(v | s) ψ*(s v) / ψ*(s): the tabular offsets set to log ψ* of every extension."""
    psi = OptimalTwist(exact, lm.vocab_size).table
    policy = TabularPolicy(lm)
    ids = tuple(lm.encode(prompt))
    with torch.no_grad():
        for prefix in live_prefixes(lm, T):
            row = policy.row((ids, *prefix))
            offsets = [psi.get((*prefix, v), -math.inf) for v in range(lm.vocab_size)]
            policy.table[row] = torch.tensor(offsets, dtype=torch.float64)
    return policy


def z_score(results, log_z: float) -> float:
    z_hat = torch.tensor([r.log_z for r in results], dtype=torch.float64).exp()
    se = float(z_hat.std()) / math.sqrt(len(z_hat))
    return (float(z_hat.mean()) - math.exp(log_z)) / se


def random_twist(lm, seed=3):
    return twistlm.LinearTwist.for_lm(lm, init_scale=0.7, seed=seed).double()


# ----------------------------------------------------------------------------------------------- toy: exactness


SAMPLERS = {
    "sis": {"ess_threshold": 0.0},
    "smc": {"ess_threshold": 1.0, "resampler": "systematic"},
    "smc_adaptive": {"ess_threshold": 0.5, "resampler": "multinomial"},
    "smc_twist_targets": {"ess_threshold": 1.0, "resampler": "stratified", "twist": "random"},
}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_random_policy_proposal_is_unbiased(toy, sampler):
    kwargs = dict(SAMPLERS[sampler])
    if kwargs.get("twist") == "random":
        kwargs["twist"] = random_twist(toy)
    exact = enumerate_target(make_target(toy, hard_potential))
    results = twistlm.run_smc(
        make_target(toy, hard_potential, RUNS), 4, proposal="policy", policy=random_policy(toy), seed=5, **kwargs
    )
    weights = torch.cat([r.log_weights for r in results])
    assert float(weights[torch.isfinite(weights)].std()) > 0.1, "the policy should not be p0 (weights would cancel)"
    if kwargs["ess_threshold"] > 0:
        assert any(r.resampled_at for r in results)
    assert abs(z_score(results, exact.log_z)) <= SE_TOLERANCE


def test_a_policy_proposal_with_a_tool_is_unbiased(toy):
    """Tool-forced tokens weigh 1 under p0 and q; the policy is stepped with them like the base LM."""
    log_z = tool_exact_log_z(toy, "d", T)
    target = make_target(toy, tool_potential, RUNS, prompt="d", tool=AfterAForceB())
    results = twistlm.run_smc(target, 4, proposal="policy", policy=random_policy(toy, prompt="d"), seed=2)
    a, b = toy.letters.index("a"), toy.letters.index("b")
    assert all(
        ids[i + 1] == b for r in results[:50] for ids in r.token_ids for i, tok in enumerate(ids[:-1]) if tok == a
    )
    assert abs(z_score(results, log_z)) <= SE_TOLERANCE


@pytest.mark.parametrize("potential", [hard_potential, soft_potential], ids=["hard", "soft"])
def test_the_optimal_policy_gives_exact_log_z_with_one_particle(toy, potential):
    exact = enumerate_target(make_target(toy, potential))
    policy = exact_policy(toy, exact)
    runs = 300
    for kwargs in ({}, {"twist": random_twist(toy)}):  # with K = 1 the twist's intermediate targets telescope away
        results = twistlm.run_smc(
            make_target(toy, potential, runs), 1, proposal="policy", policy=policy, seed=1, **kwargs
        )
        log_zs = torch.tensor([r.log_z for r in results], dtype=torch.float64)
        assert torch.allclose(log_zs, torch.full((runs,), exact.log_z, dtype=torch.float64), rtol=0.0, atol=EXACT_ATOL)


@pytest.mark.parametrize("resampler", ["systematic", "multinomial"])
def test_the_optimal_policy_and_twist_give_exact_weights_through_resampling(toy, resampler):
    """With q = σ's conditionals and ψ = ψ*, every incremental weight is Z at t = 1 and 1 afterwards — also after
    resampling, which holds only if the policy's state is reordered with the particles."""
    exact = enumerate_target(make_target(toy, hard_potential))
    policy, twist = exact_policy(toy, exact), OptimalTwist(exact, toy.vocab_size)
    results = twistlm.run_smc(
        make_target(toy, hard_potential, 200), 8, proposal="policy", policy=policy, twist=twist, resampler=resampler,
        ess_threshold=1.0, seed=3,
    )  # fmt: skip
    assert all(r.resampled_at for r in results)
    for r in results:
        assert r.log_z == pytest.approx(exact.log_z, abs=EXACT_ATOL)
        assert torch.allclose(r.log_weights, torch.zeros_like(r.log_weights), rtol=0.0, atol=EXACT_ATOL)


def test_conditional_smc_with_a_policy_bounds_log_z_from_above(toy):
    """E[log Ẑ_cSMC] ≥ log Z ≥ E[log Ẑ_SMC] with exact σ references (drawn from the enumeration)."""
    exact = enumerate_target(make_target(toy, soft_potential))
    runs = 1000
    draws = torch.multinomial(exact.probs, runs, replacement=True, generator=torch.Generator().manual_seed(0))
    refs = [list(exact.sequences[i]) for i in draws.tolist()]
    target = make_target(toy, soft_potential, runs)
    policy = random_policy(toy)
    upper = torch.tensor(
        [r.log_z for r in twistlm.run_smc(target, 4, proposal="policy", policy=policy, reference=refs)]
    )
    lower = torch.tensor([r.log_z for r in twistlm.run_smc(target, 4, proposal="policy", policy=policy, seed=1)])
    for values, sign in ((upper, 1), (lower, -1)):
        se = float(values.std()) / math.sqrt(runs)
        assert sign * (float(values.mean()) - exact.log_z) >= -3 * se
    assert float(upper.mean()) - float(lower.mean()) > 0.01


def test_an_action_space_restricts_q_and_what_z_estimates(toy):
    """Tokens outside the space and a stop before min_len get q = 0: Ẑ then estimates Σ p0 φ over the sequences q can
    reach (σ's support is not inside q's here, so that sum is below Z), while the weights stay exact."""
    c = toy.letters.index("c")
    allowed = torch.ones(toy.vocab_size, dtype=torch.bool)
    allowed[c] = False
    eos = toy.eos_token_id
    space = ActionSpace(allowed, (eos,), min_len=1, max_len=T)
    exact = enumerate_target(make_target(toy, soft_potential))
    reachable = torch.tensor([c not in seq and seq != (eos,) for seq in exact.sequences])
    log_z_space = float(torch.logsumexp((exact.log_p0 + exact.log_phi)[reachable], 0))
    results = twistlm.run_smc(
        make_target(toy, soft_potential, RUNS), 4, proposal="policy", policy=random_policy(toy), policy_space=space,
        seed=4,
    )  # fmt: skip
    assert all(c not in ids and ids != [eos] for r in results for ids in r.token_ids)
    assert abs(z_score(results, log_z_space)) <= SE_TOLERANCE
    assert z_score(results, exact.log_z) < -SE_TOLERANCE, "the restriction must visibly lose the mass outside it"


def test_an_action_space_that_covers_sigma_keeps_z_unbiased(toy):
    """φ = 0 wherever the space puts q = 0 (here: the empty completion, ruled out by min_len = 1)."""
    eos = toy.eos_token_id
    space = ActionSpace(torch.ones(toy.vocab_size, dtype=torch.bool), (eos,), min_len=1, max_len=T)
    exact = enumerate_target(make_target(toy, hard_potential))
    assert hard_potential([""]) == [-math.inf]
    results = twistlm.run_smc(
        make_target(toy, hard_potential, RUNS), 4, proposal="policy", policy=random_policy(toy), policy_space=space,
        seed=6,
    )  # fmt: skip
    assert abs(z_score(results, exact.log_z)) <= SE_TOLERANCE


def test_a_reference_outside_the_action_space_is_refused(toy):
    c = toy.letters.index("c")
    allowed = torch.ones(toy.vocab_size, dtype=torch.bool)
    allowed[c] = False
    space = ActionSpace(allowed, (toy.eos_token_id,), min_len=0, max_len=T)
    with pytest.raises(TwistLMError, match="q = 0 under the policy's action space"):
        twistlm.run_smc(
            make_target(toy, soft_potential),
            4,
            proposal="policy",
            policy=random_policy(toy),
            policy_space=space,
            reference=[[0, c, toy.eos_token_id]],
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"proposal": "policy"}, "needs a policy"),
        ({"proposal": "base", "policy": "random"}, "needs proposal='policy'"),
        ({"policy_space": "space"}, "give policy=... too"),
        ({"proposal": "policy", "policy": "other-vocab"}, "vocabulary has 6 tokens"),
        ({"proposal": "policy", "policy": "target-lm"}, "computes with the target's own model"),
        ({"proposal": "policy", "policy": "not-an-lm"}, "must be a ParticleLM"),
    ],
)
def test_bad_policy_arguments_are_clear_errors(toy, kwargs, message):
    values = {
        "random": random_policy(toy),
        "other-vocab": twistlm.ToyLM(vocab_size=6, seed=1),
        "target-lm": toy,
        "not-an-lm": object(),
        "space": ActionSpace(torch.ones(toy.vocab_size, dtype=torch.bool), (toy.eos_token_id,), 0, T),
    }
    kwargs = {k: values.get(v, v) for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=message):
        twistlm.smc(make_target(toy, None), 4, **kwargs)


def test_the_memory_check_counts_the_policy(toy, monkeypatch):
    from twistlm import memory

    runs, K = 500, 4
    target, policy = make_target(toy, None, runs), random_policy(toy)
    rows, seq_len = runs * K, len(target.prompt_ids[0]) + T
    buffers = memory.BASE_VOCAB_BUFFERS + memory.PROPOSAL_VOCAB_BUFFERS
    device, host = memory.sampler_bytes(toy, rows, seq_len, T, buffers)
    limit = device + host + memory.policy_bytes(policy.lm, rows, seq_len) // 2  # fits without the policy's share
    monkeypatch.setattr(memory, "available_bytes", lambda where="cpu": limit)
    twistlm.run_smc(target, K, proposal="tempered", temperature=2.0)  # as many (N, V) buffers, no second LM
    with pytest.raises(ConfigError, match=f"{rows} particles"):
        twistlm.run_smc(target, K, proposal="policy", policy=policy)


def test_the_bounds_take_a_policy_proposal_and_its_sis_row(toy):
    from twistlm.bounds import Proposal, log_z_bounds

    target = make_target(toy, soft_potential)
    policy = random_policy(toy)
    rows = {"policy": Proposal("policy", policy=policy, sis=True), "policy + SMC": Proposal("policy", policy=policy)}
    bounds = log_z_bounds(target, rows, (1, 4), num_runs=200, seed=0)
    log_z = enumerate_target(target).log_z
    for e in bounds.entries:
        assert e.lower.mean <= log_z + 3 * e.lower.stderr
    with pytest.raises(ConfigError, match="needs a policy"):
        Proposal("policy")


# ---------------------------------------------------------------------------------------- the LoRA policy (API)


EMBEDDED_TASK = "policy-proposal-test"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A tiny saved LoRA policy (r = 2, random B) on the embedded model, trained 'for' the test task."""
    from twistlm.gfn.policy import LoRAPolicy, LoraSettings

    policy = LoRAPolicy.create(twistlm.load_lm(), LoraSettings(r=2, alpha=4))
    with torch.no_grad():
        for name, p in policy.lm.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("lora") / "pol"
    policy.save_pretrained(folder, task=EMBEDDED_TASK, extra={"task_options": {"weight": 1.0}})
    return folder


@pytest.mark.model
def test_lora_policy_weights_are_p0_phi_over_q_of_the_sampled_tokens(lora_dir, smol):
    """K = 1: log w = Σ_t log p0(s_t) − log q(s_t) + log φ(s), p0 and q scored independently of the sampler."""
    from twistlm.gfn.policy import load_policy

    policy = load_policy(twistlm.load_lm(), lora_dir)
    pot = FunctionPotential(lambda texts: [-0.1 * len(t) for t in texts], name="short")
    target = twistlm.Target(smol, prompts=["I bought this", "The weather"], potential=pot, max_new_tokens=4)
    results = twistlm.run_smc(target, 1, proposal="policy", policy=policy, seed=0)
    for b, r in enumerate(results):
        ids = r.token_ids[0]
        prompt = target.prompt_ids[b]
        log_p0 = float(smol.score_tokens(smol.prefill([prompt], 1), [ids], [0])[0])
        log_q = float(policy.score_tokens(policy.prefill([prompt], 1), [ids], [0])[0])
        expected = log_p0 - log_q + float(r.log_phi[0])
        assert float(r.log_weights[0]) == pytest.approx(expected, abs=1e-3)
        assert abs(log_p0 - log_q) > 1e-3, "the adapter should change the distribution"
    shared = twistlm.HFLM(policy.model, policy.tokenizer, name=policy.name)  # the model load_policy injected into
    with pytest.raises(ConfigError, match="computes with the target's own model"):
        twistlm.smc(twistlm.Target(shared, prompt="Hi", max_new_tokens=2), 2, proposal="policy", policy=policy)


# ---------------------------------------------------------------------------------------------------- the CLI


def _soft(texts):
    return [-0.3 * len(t) for t in texts]


@pytest.fixture
def embedded_task(monkeypatch):
    def build(lm, max_new_tokens=None, num_prompts=1, weight=1.0):
        pot = FunctionPotential(lambda texts: [weight * v for v in _soft(texts)], name="short", bounded=True)
        return twistlm.Target(
            lm, prompts=["I bought this"] * num_prompts, potential=pot, max_new_tokens=max_new_tokens or 2
        )

    monkeypatch.setitem(TASKS, EMBEDDED_TASK, Task(EMBEDDED_TASK, "short completions (test)", build))


@pytest.mark.model
def test_cli_sample_with_a_policy_proposal(tmp_path, lora_dir, embedded_task, capsys):
    out = tmp_path / "s.json"
    args = [
        "sample",
        "--task",
        EMBEDDED_TASK,
        "--proposal",
        "policy",
        "--policy",
        str(lora_dir),
        "-K",
        "4",
        "-q",
        "--json",
        str(out),
    ]
    assert run_app(args) == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["settings"]["proposal"] == "policy" and data["settings"]["policy"] == str(lora_dir)
    assert data["settings"]["task_options"] == {"weight": 1.0}  # the policy's own, filled in
    assert math.isfinite(data["log_z"]) and len(data["particles"]) == 4


@pytest.mark.model
def test_cli_evaluate_with_a_policy_and_a_twist(tmp_path, lora_dir, embedded_task, smol, capsys):
    from twistlm.twists.embedding import EmbeddingTwist

    twist_dir = tmp_path / "tw"
    EmbeddingTwist.for_lm(smol, width=8, init_scale=0.1, seed=1).save_pretrained(twist_dir)
    out = tmp_path / "eval"
    # Few forward passes (one token, K = 1, two runs): the CPU cost is the 135M model's weights read per pass.
    args = [
        "evaluate",
        "--task",
        EMBEDDED_TASK,
        "--policy",
        str(lora_dir),
        "--twist",
        str(twist_dir),
        "-K",
        "1",
        "-T",
        "1",
        "--seeds",
        "2",
        "--batch-particles",
        "16",
        "--out",
        str(out),
        "-q",
    ]
    assert run_app(args) == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    names = {e["proposal"] for e in data["bounds"]["entries"]}
    assert names == {"base", "twist:tw", "policy:pol", "policy:pol + SMC", "policy:pol + twist:tw + SMC"}
    assert data["meta"]["policies"] == {"policy:pol": str(lora_dir)}
    assert set(data["kl"]) == names and data["exact_samples"]["method"] == "rejection"
    for e in data["bounds"]["entries"]:
        assert math.isfinite(e["lower"]["mean"]) and math.isfinite(e["upper"]["mean"])
    assert "| policy:pol + SMC |" in (out / "report.md").read_text()


def _policy_folder(tmp_path: Path, skip: str | None = None, **info) -> Path:
    """A hand-made policy folder (weights never read: every refusal happens before)."""
    from twistlm.embedded import EMBEDDED_NAME

    folder = tmp_path / "handmade"
    folder.mkdir()
    info = {"base_model": EMBEDDED_NAME, "vocab_size": 49152, "task": EMBEDDED_TASK, **info}
    files = {"gfn_policy.json": json.dumps(info), "adapter_config.json": "{}", "adapter_model.safetensors": ""}
    for name, text in files.items():
        if name != skip:
            (folder / name).write_text(text)
    return folder


REFUSALS = [
    ({"skip": "adapter_model.safetensors"}, [], "has no adapter_model.safetensors"),
    ({"skip": "adapter_config.json"}, [], "has no adapter_config.json"),
    ({"skip": "gfn_policy.json"}, [], "has no gfn_policy.json"),
    ({"task": "arithmetic"}, [], f"trained for task 'arithmetic', not '{EMBEDDED_TASK}'"),
    ({"task_options": {"weight": 2.0}}, ["-o", "weight=1.5"], "trained with task option weight=2.0"),
    ({"task_options": {"colour": "red"}}, [], "has no option 'colour'"),
    ({}, ["--model", "toy"], "--policy needs a Hugging Face model"),
]
LOADED_REFUSALS = [
    ({"base_model": "gpt2"}, "trained on base model 'gpt2'"),
    ({"vocab_size": 50257}, "(vocabulary 50257)"),
    ({"tokenizer": "0" * 16}, "trained with another tokenizer"),
]


@pytest.mark.parametrize("command", ["sample", "evaluate"])
@pytest.mark.parametrize("info, extra, message", REFUSALS)
def test_cli_refuses_a_policy_that_does_not_fit_before_loading_a_model(
    tmp_path, embedded_task, capsys, monkeypatch, command, info, extra, message
):
    from twistlm.cli import evaluate as evaluate_cli
    from twistlm.cli import sample as sample_cli

    def no_model(name):
        raise AssertionError("a policy that does not fit must be refused before any model is loaded")

    for module in (sample_cli, evaluate_cli):
        monkeypatch.setattr(module, "load_model", no_model)
    folder = _policy_folder(tmp_path, **info)
    args = {
        "sample": ["sample", "--proposal", "policy", "-K", "2"],
        "evaluate": ["evaluate", "--out", str(tmp_path / "o"), "--seeds", "2"],
    }[command]
    code = run_app([*args, "--task", EMBEDDED_TASK, "--policy", str(folder), *extra])
    err = capsys.readouterr().err
    assert code == USAGE_ERROR, err
    assert message in err.replace("\n", " ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.model
@pytest.mark.parametrize("info, message", LOADED_REFUSALS)
def test_cli_refuses_a_policy_for_another_model_or_tokenizer(tmp_path, embedded_task, capsys, info, message):
    folder = _policy_folder(tmp_path, **info)
    code = run_app(
        ["sample", "--task", EMBEDDED_TASK, "--proposal", "policy", "--policy", str(folder), "-K", "2", "-q"]
    )
    err = capsys.readouterr().err
    assert code == USAGE_ERROR, err
    assert message in err.replace("\n", " ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--proposal", "policy"], "--proposal policy needs a trained GFlowNet policy"),
        (["--policy", "somewhere"], "add --proposal policy"),
    ],
)
def test_cli_sample_policy_flags_go_together(capsys, args, message):
    assert run_app(["sample", "--prompt", "ab", "--model", "toy", *args]) == USAGE_ERROR
    assert message in capsys.readouterr().err


@pytest.mark.model
def test_cli_solve_with_a_policy_leaves_the_cached_base_model_alone(tmp_path, capsys):
    """``solve --policy`` decodes with the policy on a private copy: afterwards the process's cached base model is
    still p0 (no adapter injected into it), so a later command in the same process samples from p0."""
    from twistlm.cli import common
    from twistlm.gfn.policy import LoRAPolicy, LoraSettings

    base = common.load_model(None)
    prompt = torch.tensor([base.encode("I bought this")])
    with torch.no_grad():
        before = base.model(prompt).logits
    policy = LoRAPolicy.create(twistlm.load_lm(), LoraSettings(r=2, alpha=4))
    with torch.no_grad():
        for name, p in policy.lm.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "pol"
    policy.save_pretrained(folder, task="arithmetic", extra={"task_options": {}})
    args = ["solve", "--task", "arithmetic", "--policy", str(folder), "--limit", "1", "-n", "1", "-T", "2", "-q"]
    assert run_app(args) == 0, capsys.readouterr().err
    assert common.load_model(None) is base
    assert not any("lora" in name for name, _ in base.model.named_modules())
    with torch.no_grad():
        assert torch.equal(base.model(prompt).logits, before)
