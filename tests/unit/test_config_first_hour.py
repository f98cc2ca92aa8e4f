"""Config mistakes a new user makes in the first hour: an empty recipe, a bad trainer.steps
blamed on another key, and a warm-up longer than a short run."""

import random

import pytest

from sparsetron.launch.cli import main
from sparsetron.model.config import ConfigError
from sparsetron.train.config import ScheduleConfig
from sparsetron.train.config_io import load_job_config, to_dict
from sparsetron.train.resume import compare_with_checkpoint
from sparsetron.train.schedule import lr_multiplier


@pytest.mark.parametrize("text", ["", "\n  \n", "# only a comment\n\n# and another\n"])
def test_an_empty_recipe_is_refused_naming_the_file(tmp_path, capsys, text):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(text)
    run_dir = tmp_path / "runs"
    assert main(["train", str(recipe), "--set", f"trainer.run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {recipe}: the file is empty (or only comments); a recipe holds sections such as "
        "'trainer: {run_dir: runs/mine}' (or name a shipped recipe)"
    ]
    assert not run_dir.exists()


@pytest.mark.parametrize("text, kind", [("- trainer\n- model\n", "list"), ("42\n", "int"), ("just words\n", "str")])
def test_a_recipe_that_is_not_a_mapping_is_refused(tmp_path, text, kind):
    recipe = tmp_path / "odd.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=rf"odd\.yaml: the top level must be a mapping of sections, got {kind}"):
        load_job_config(str(recipe))


@pytest.mark.parametrize("steps", [0, -5, -random.randint(6, 10**6)])
def test_a_bad_trainer_steps_is_reported_under_its_own_key(steps):
    # Every recipe has a warm-up checked against trainer.steps; that check must not speak first.
    for recipe in ("tiny", "debug-dense"):
        with pytest.raises(ConfigError, match=rf"^trainer\.steps: must be >= 1, got {steps}$"):
            load_job_config(recipe, [f"trainer.steps={steps}"])


def test_a_fractional_warmup_scales_with_the_run_and_a_count_does_not():
    steps = random.randint(50, 5000)
    fraction = random.choice([0.05, 0.1, 0.25, 0.3])
    frac = ScheduleConfig(warmup_steps=fraction)
    assert frac.warmup_for(steps) == round(fraction * steps)
    assert ScheduleConfig(warmup_steps=7).warmup_for(steps) == 7
    # The ramp itself: linear to the peak over exactly the resolved number of steps.
    w = frac.warmup_for(steps)
    assert [lr_multiplier(frac, s, steps) for s in range(w)] == [(s + 1) / w for s in range(w)]
    assert lr_multiplier(frac, w, steps) == 1.0


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_tiny_keeps_its_schedule_exactly(kind):
    # tiny moved from warmup_steps: 30 to 0.1 of its 300 steps: every step's rate is bitwise the same.
    job = load_job_config("tiny", [f"schedule.kind={kind}"])
    assert job.trainer.steps == 300 and job.schedule.warmup_steps == 0.1
    count = ScheduleConfig(kind=kind, warmup_steps=30, min_lr_ratio=job.schedule.min_lr_ratio)
    assert [lr_multiplier(job.schedule, s, 300) for s in range(300)] == [
        lr_multiplier(count, s, 300) for s in range(300)
    ]


def test_short_runs_of_shipped_recipes_are_accepted():
    for recipe in ("tiny", "tiny-moba", "long-moba"):
        job = load_job_config(recipe, ["trainer.steps=20"])
        assert 0 < job.schedule.warmup_for(20) < 20, recipe
    # A count given on the command line still replaces the recipe's fraction.
    assert load_job_config("tiny", ["trainer.steps=5", "schedule.warmup_steps=1"]).schedule.warmup_for(5) == 1
    # A whole number keeps its type in the saved config.yaml.
    assert to_dict(load_job_config("debug-dense"))["schedule"]["warmup_steps"] == 2


@pytest.mark.parametrize(
    "value, pattern",
    [
        ("1.5", r"must be a whole number of steps or a fraction in \(0, 1\) of trainer\.steps, got 1\.5"),
        ("-0.1", r"must be a whole number of steps or a fraction in \(0, 1\) of trainer\.steps, got -0\.1"),
        ("301", r"must be in \[0, trainer\.steps=300\] \(or a fraction below 1 of it\), got 301"),
        ("true", r"expected a number, got True"),
        ("ten", r"expected a number, got 'ten'"),
    ],
)
def test_bad_warmups_name_the_key(value, pattern):
    with pytest.raises(ConfigError, match=rf"^schedule\.warmup_steps: {pattern}$"):
        load_job_config("tiny", [f"schedule.warmup_steps={value}"])


def test_resume_lists_what_a_fractional_warmup_does(tmp_path):
    # A checkpoint of tiny from before the fraction: the spelling changed, the warm-up did not.
    saved = to_dict(load_job_config("tiny"))
    saved["schedule"]["warmup_steps"] = 30
    changed = compare_with_checkpoint(load_job_config("tiny"), saved, tmp_path)
    assert changed == [
        "schedule.warmup_steps: 30 -> 0.1",
        "warm-up steps (schedule.warmup_steps of trainer.steps): 30 -> 30",
    ]
    # The same recipe resumed: nothing changed, nothing listed.
    assert compare_with_checkpoint(load_job_config("tiny"), to_dict(load_job_config("tiny")), tmp_path) == []
    # A longer run stretches a fractional warm-up: said, since the rate at later steps moves.
    changed = compare_with_checkpoint(
        load_job_config("tiny", ["trainer.steps=600"]), to_dict(load_job_config("tiny")), tmp_path
    )
    assert "warm-up steps (schedule.warmup_steps of trainer.steps): 30 -> 60" in changed
