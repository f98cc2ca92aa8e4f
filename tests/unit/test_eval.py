"""`sparsetron eval`: a checkpoint's loss on the validation batches equals the eval loss the run
recorded at that step; other data and bad input. `sparsetron generate` on the same run's checkpoint
(its sampling loop is tested against a manual one in test_generate.py)."""

import random
import shutil

import pytest

from sparsetron.launch.cli import main
from sparsetron.train.config_io import load_job_config
from sparsetron.train.evaluate import evaluate_checkpoint
from sparsetron.train.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """debug-dense trained 4 steps with fresh seeds, evaluated and saved after steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("run")
    rng = random.Random()
    job = load_job_config(
        "debug-dense",
        [
            f"trainer.run_dir={run_dir}",
            "trainer.steps=4",
            "trainer.eval_interval=2",
            "checkpoint.interval=2",
            "schedule.warmup_steps=1",
            "metrics.console=none",
            "data.max_documents=120",
            f"trainer.eval_batches={rng.randint(1, 3)}",
            f"trainer.seed={rng.randrange(1 << 30)}",
            f"data.seed={rng.randrange(1 << 30)}",
        ],
    )
    return run_dir, Trainer(job).run()


def test_eval_gives_the_loss_the_run_recorded_at_each_checkpoint(run, capsys):
    run_dir, result = run
    for step in (2, 4):
        evaluated = evaluate_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}")
        assert evaluated.step == step
        assert evaluated.loss == pytest.approx(result.eval_losses[step], rel=1e-6, abs=1e-6)
    # A run folder means its newest checkpoint.
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "step_00000004 (step 4)" in out and f"eval loss {result.eval_losses[4]:.4f}" in out
    assert "perplexity" in out and "tokens" in out


def test_eval_on_other_files_and_more_batches(run, tmp_path, capsys):
    run_dir, _ = run
    text = tmp_path / "held_out.txt"
    text.write_text("".join(random.choice("abcdefgh \n") for _ in range(3000)))
    step4 = str(run_dir / "checkpoints" / "step_00000004")
    args = ["eval", step4, "--data", str(text), "--set", "data.source=text", "--batches", "3"]
    args += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 batches of data.val_paths" in out
    # debug-dense's micro-batch of 4 rows of 64 positions, every target counted.
    assert "over 768 tokens" in out


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("empty", "holds no complete step folder"),
        ("half-written", "lacks the .complete marker"),
        ("corrupt", "__0_0.distcp"),
        ("stdlib-data", "--set data.source=text"),
        ("missing-data", "nowhere.txt"),
        ("zero-batches", "--batches must be at least 1"),
    ],
)
def test_bad_input_is_one_error_line(run, tmp_path, case, message, capsys):
    run_dir, _ = run
    step4 = tmp_path / "step_00000004"
    shutil.copytree(run_dir / "checkpoints" / "step_00000004", step4)
    args = {
        "missing": [str(tmp_path / "nothing")],
        "empty": [str(tmp_path / "empty")],
        "half-written": [str(step4)],
        "corrupt": [str(step4)],
        "stdlib-data": [str(step4), "--data", "x.txt"],
        "missing-data": [str(step4), "--data", str(tmp_path / "nowhere.txt"), "--set", "data.source=text"],
        "zero-batches": [str(step4), "--batches", "0"],
    }[case]
    (tmp_path / "empty").mkdir()
    if case == "half-written":
        (step4 / ".complete").unlink()
    if case == "corrupt":
        data = step4 / "__0_0.distcp"
        content = bytearray(data.read_bytes())
        content[len(content) // 2] ^= 0xFF
        data.write_bytes(bytes(content))
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_generate_prints_the_prompt_and_its_continuation(run, capsys):
    run_dir, _ = run
    greedy = ["generate", str(run_dir), "--prompt", "def f(x):", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(greedy) == 0
    text = capsys.readouterr().out
    assert text.startswith("def f(x):") and len(text) > len("def f(x):\n"), text
    assert main(greedy) == 0 and capsys.readouterr().out == text  # greedy: the same text
    sampled = ["generate", str(run_dir / "checkpoints" / "step_00000002"), "--prompt", "import ", "--seed", "7"]
    assert main([*sampled, "--max-new-tokens", "12", "--top-k", "5", "--set", "trainer.device=cpu"]) == 0
    first = capsys.readouterr().out
    assert main([*sampled, "--max-new-tokens", "12", "--top-k", "5", "--set", "trainer.device=cpu"]) == 0
    assert first.startswith("import ") and capsys.readouterr().out == first
    # Another seed, another sample (at a temperature that flattens the distribution, so that 40 tokens
    # drawn alike are out of reach).
    hot = ["generate", str(run_dir), "--prompt", "import ", "--max-new-tokens", "40", "--temperature", "2"]
    assert main([*hot, "--seed", "1"]) == 0 and main([*hot, "--seed", "2"]) == 0
    one, two = capsys.readouterr().out.split("\nimport ")
    assert one[len("import ") :] != two.removesuffix("\n"), (one, two)
    assert main(["generate", str(run_dir), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "--temperature must be >= 0" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "--prompt", ""]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
