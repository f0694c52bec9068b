"""A task's own training recipe: which forms of the task it applies to, and a recipe that trains on a relaxation of
the user's potential (the twist is for the user's target; the training target is the relaxed one)."""

from __future__ import annotations

import json

import pytest
from test_training import run_app, toy_task  # noqa: F401 (toy_task: a fixture)

from twistlm import recipes
from twistlm.cli import train_twist as train_twist_cli
from twistlm.recipes import TwistRecipe, twist_recipe


def test_the_toxicity_threshold_recipe_trains_on_the_tempered_relaxation():
    own = twist_recipe("ctl", None, "toxicity")
    assert own.training_options["form"] == "tempered" and own.training_options["beta"] > 1
    assert twist_recipe("ctl", None, "toxicity", {"form": "threshold"}) is own
    # the soft form has its own (no relaxation); another kind or another loss: not the task's
    soft = twist_recipe("ctl", None, "toxicity", {"form": "tempered"})
    assert soft is not own and soft is not twist_recipe("ctl") and not soft.training_options
    assert soft.config["corpus_tokens"] == own.config["corpus_tokens"]
    assert twist_recipe("ctl", None, "toxicity", {"form": "tempered", "beta": 1}) is soft
    assert twist_recipe("ctl", None, "toxicity", {"form": "tempered", "beta": 3}) is twist_recipe("ctl")
    assert twist_recipe("ctl", "embedding", "toxicity") is twist_recipe("ctl", "embedding")
    assert twist_recipe("sixo", None, "toxicity") is twist_recipe("sixo")


@pytest.fixture
def relaxed_recipe(monkeypatch):
    recipe = TwistRecipe(
        "ctl", "tabular", {}, {"max_steps": 1, "num_particles": 8, "positives": "exact", "learning_rate": 0.1},
        "test", training_options={"letter": 1}, applies=lambda options: "letter" not in options,
    )
    monkeypatch.setitem(recipes.TASK_RECIPES, ("toy-letter", "ctl"), (recipe,))
    return recipe


@pytest.mark.usefixtures("toy_task", "relaxed_recipe")
@pytest.mark.parametrize(("given", "trained_on"), [([], {"letter": 1}), (["-o", "letter=0"], {"letter": 0})])
def test_train_twist_builds_its_training_target_from_the_recipes_relaxation(tmp_path, capsys, monkeypatch, given,
                                                                              trained_on):
    seen = []
    make = train_twist_cli.make_twist_trainer

    def recording(twist, target, config, **kwargs):
        seen.append(target.extras["label"])
        return make(twist, target, config, **kwargs)

    monkeypatch.setattr(train_twist_cli, "make_twist_trainer", recording)
    out = tmp_path / "o"
    argv = ["train-twist", "--task", "toy-letter", *given, "--model", "toy", "--loss", "ctl", "--twist-kind", "tabular",
            "--positives", "exact", "--steps", "1", "--particles", "8", "--out", str(out)]
    assert run_app(argv) == 0, capsys.readouterr().err
    info = json.loads((out / "training_config.json").read_text())
    assert info["training_task_options"] == trained_on
    assert info["task_options"] == {k: v for k, v in trained_on.items() if given}
    assert seen == [[trained_on["letter"]]]
