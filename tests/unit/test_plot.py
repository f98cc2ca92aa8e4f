"""`sparsetron plot`: PNGs from a run's metrics.jsonl (written here by MetricsLogger, as the
trainer writes it), the expert-load heatmap for MoE runs only, and one error line for bad input."""

import random
import struct

import numpy as np
import pytest

from sparsetron.launch.cli import main
from sparsetron.train.config import MetricsConfig
from sparsetron.train.metrics import MetricsLogger
from sparsetron.train.plot import read_series, relative_load

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def write_metrics(run_dir, steps, moe_layers=(), experts=8, start=1, names=("loss", "lr", "grad_norm")):
    """Training scalars (`names`) every 2 steps, an eval loss every 10, tokens per expert per MoE layer."""
    import torch

    rng = random.Random()
    with MetricsLogger(MetricsConfig(tensorboard=False), run_dir) as metrics:
        for step in range(start, steps + 1):
            if step % 2 == 0:
                histograms = {
                    f"moe/layer{layer}/tokens_per_expert": torch.tensor([rng.randint(0, 400) for _ in range(experts)])
                    for layer in moe_layers
                }
                scalars = {"loss": 6 - step / 20 + rng.random(), "lr": 1e-3 * rng.random(), "grad_norm": rng.random()}
                metrics.log(step, {name: scalars[name] for name in names}, histograms)
            if step % 10 == 0:
                metrics.log(step, {"eval/loss": 6 - step / 20})


def test_moe_run_gives_four_pngs(tmp_path, capsys):
    layers = sorted(random.sample(range(1, 8), 3))
    write_metrics(tmp_path, 60, moe_layers=layers)
    assert main(["plot", str(tmp_path)]) == 0
    names = {"loss.png", "lr.png", "grad_norm.png", "expert_load.png"}
    assert {p.name for p in (tmp_path / "plots").iterdir()} == names
    for name in names:
        width, height = png_size(tmp_path / "plots" / name)
        assert 300 < width < 2000 and 200 < height < 2000, (name, width, height)
        assert 5_000 < (tmp_path / "plots" / name).stat().st_size < 300_000
    # One panel per MoE layer: the heatmap grows with the layers.
    assert png_size(tmp_path / "plots" / "expert_load.png")[1] > 1.5 * png_size(tmp_path / "plots" / "loss.png")[1]
    assert capsys.readouterr().out.count("wrote ") == 4


def test_dense_run_says_there_is_no_heatmap_and_out_picks_the_folder(tmp_path, capsys):
    write_metrics(tmp_path / "run", 20, names=("loss",))  # one figure: what is not logged is not drawn
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "figures")]) == 0
    assert [p.name for p in (tmp_path / "figures").iterdir()] == ["loss.png"]
    assert "no expert-load heatmap" in capsys.readouterr().out


def test_relative_load_is_one_where_uniform_and_proportional_to_the_counts():
    by_step = {step: [random.randint(1, 100) for _ in range(6)] for step in range(0, 50, 5)}
    load = relative_load(by_step)
    assert load.shape == (6, 10)
    np.testing.assert_allclose(load.mean(axis=0), 1.0)
    counts = np.array(list(by_step.values())).T
    np.testing.assert_allclose(load * counts.mean(axis=0), counts)


def test_a_resumed_run_replaces_the_steps_it_logged_again(tmp_path):
    write_metrics(tmp_path, 30)
    write_metrics(tmp_path, 24, start=17)  # resumed from step 16: steps 18..30 again, to 24
    series = read_series(tmp_path / "metrics.jsonl")
    assert list(series["loss"]) == list(range(2, 25, 2))
    assert list(series["eval/loss"]) == [10, 20]


@pytest.mark.parametrize("case", ["no-folder", "no-metrics", "malformed", "empty", "out-is-a-file"])
def test_bad_input_is_one_error_line(tmp_path, case, capsys):
    run_dir = tmp_path / "run"
    if case != "no-folder":
        run_dir.mkdir()
    if case == "malformed":
        write_metrics(run_dir, 10)
        text = (run_dir / "metrics.jsonl").read_text().splitlines()
        (run_dir / "metrics.jsonl").write_text("\n".join([text[0], "{oops", *text[1:]]) + "\n")
    if case == "empty":
        (run_dir / "metrics.jsonl").write_text("")
    out = []
    if case == "out-is-a-file":
        write_metrics(run_dir, 4)
        (run_dir / "taken").write_text("")
        out = ["--out", str(run_dir / "taken")]
    assert main(["plot", str(run_dir), *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(run_dir) in err, err
    assert case != "malformed" or "line 2" in err
    assert not (run_dir / "plots").exists()
