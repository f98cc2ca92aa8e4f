"""Metric sinks, FLOP counting and the console progress line."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from fake_terminal import FakeTerminal

from sparsetron.train.config import MetricsConfig
from sparsetron.train.flops import flops_per_token, mfu, peak_tflops, peak_tflops_for_name
from sparsetron.train.metrics import MetricsLogger, memory_stats
from sparsetron.train.progress import Progress, format_duration, format_moe, format_rate

# ---- MetricsLogger ---------------------------------------------------------------------


def read_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_and_tensorboard_hold_the_scalars(tmp_path):
    logger = MetricsLogger(MetricsConfig(), tmp_path)
    logger.log(10, {"train/loss": 2.5, "train/lr": 1e-3})
    logger.log(20, {"train/loss": torch.tensor(2.25), "train/lr": 5e-4, "train/grad_norm": float("nan")})
    logger.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20]
    assert lines[0]["train/loss"] == 2.5 and lines[1]["train/loss"] == 2.25
    assert lines[1]["train/lr"] == 5e-4
    assert lines[1]["train/grad_norm"] is None  # NaN is not JSON
    assert all(isinstance(line["time"], float) for line in lines)

    scalars = read_tensorboard(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(10, 2.5), (20, 2.25)]
    assert [s for s, _ in scalars["train/lr"]] == [10, 20]
    assert scalars["train/lr"][1][1] == pytest.approx(5e-4)
    assert math.isnan(scalars["train/grad_norm"][0][1])


def test_histograms_reach_tensorboard_and_jsonl(tmp_path):
    load = torch.randint(0, 500, (16,))
    logger = MetricsLogger(MetricsConfig(), tmp_path)
    logger.log(7, {"loss": 1.0}, {"moe/layer1/tokens_per_expert": load})
    logger.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["moe/layer1/tokens_per_expert"] == [float(v) for v in load.tolist()]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    (event,) = acc.Histograms("moe/layer1/tokens_per_expert")
    assert event.step == 7
    assert event.histogram_value.num == 16 and event.histogram_value.sum == pytest.approx(float(load.sum()))
    assert event.histogram_value.max == pytest.approx(float(load.max()))


def test_resumed_run_appends_to_jsonl(tmp_path):
    with MetricsLogger(MetricsConfig(tensorboard=False), tmp_path) as logger:
        logger.log(1, {"loss": 3.0})
    with MetricsLogger(MetricsConfig(tensorboard=False), tmp_path, start_step=2) as logger:
        logger.log(2, {"loss": 2.0})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert not (tmp_path / "tensorboard").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(MetricsConfig(), tmp_path / "run", enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_memory_stats_on_cpu():
    stats = memory_stats("cpu")
    assert set(stats) == {"max_rss_gib"}
    # This very process holds torch: more than 50 MiB, less than a terabyte.
    assert 0.05 < stats["max_rss_gib"] < 1024


# ---- FLOPs -----------------------------------------------------------------------------


def test_flops_per_token_by_hand():
    # 2 layers, 4 heads of 8, sequence 16, 1000 active weights:
    # 6 * 1000 + 12 * 2 * 4 * 8 * 16 / 2 = 6000 + 6144.
    assert flops_per_token(1000, 2, 4, 8, 16) == 12144.0


@pytest.mark.parametrize(("seq_len", "block_size", "topk"), [(100, 8, 3), (61, 16, 2), (64, 8, 1), (40, 16, 3)])
def test_moba_layers_count_the_keys_the_op_attends(seq_len, block_size, topk):
    """The mean attended keys equals what the MoBA function's own mask allows (any routing)."""
    from sparsetron.kernels.moba import moba_selection
    from sparsetron.model.config import AttentionConfig

    g = torch.Generator().manual_seed(seq_len)
    q, k = torch.randn(seq_len, 2, 8, generator=g), torch.randn(seq_len, 2, 8, generator=g)
    chosen_HLn = moba_selection(q, k, block_size, topk)
    t, u = torch.arange(seq_len).view(-1, 1), torch.arange(seq_len).view(1, -1)
    allowed_HLL = chosen_HLn[:, :, u.flatten() // block_size] & (u <= t)
    attended = allowed_HLL.sum().item() / (2 * seq_len)
    attn = AttentionConfig(backend="moba", moba_block_size=block_size, moba_topk=topk, moba_full_layers=[1])
    keys = attn.attended_keys(3, seq_len)
    # Full attention's convention is seq_len / 2; MoBA counts exactly, but never above that.
    assert keys == [min(attended, seq_len / 2), seq_len / 2, min(attended, seq_len / 2)]
    assert attn.attended_keys(3, seq_len, moba=False) == [seq_len / 2] * 3
    assert AttentionConfig().attended_keys(2, seq_len) == [seq_len / 2] * 2
    # The default keys are the causal convention; fewer keys, fewer FLOPs.
    assert flops_per_token(1000, 3, 4, 8, seq_len, [seq_len / 2] * 3) == flops_per_token(1000, 3, 4, 8, seq_len)
    if attended < seq_len / 2:
        assert flops_per_token(1000, 3, 4, 8, seq_len, keys) < flops_per_token(1000, 3, 4, 8, seq_len)


def test_mfu_matches_the_h100_anchor():
    # anchors.md: dense 0.89B non-embedding params, 16 layers of width 2048 (16 x 128),
    # sequence 4096, 72,500 tok/s on one H100 = 44.9% MFU.
    fpt = flops_per_token(0.89e9, 16, 16, 128, 4096)
    assert mfu(72_500, fpt, 989.0) == pytest.approx(0.449, abs=0.002)
    assert mfu(72_500, fpt, None) is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Some Future Accelerator", None),
    ],
)
def test_peak_tflops_lookup(name, peak):
    assert peak_tflops_for_name(name) == peak


def test_peak_tflops_is_none_on_cpu():
    assert peak_tflops("cpu") is None


# ---- Progress --------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def terminal(monkeypatch):
    return FakeTerminal(monkeypatch)


def test_plain_lines(capsys):
    clock = FakeClock()
    progress = Progress("plain", total_steps=300, started=clock.now - 30.0, clock=clock)
    clock.now += 2.0
    # Between log intervals plain mode prints nothing; the ETA's rate counts from here.
    progress.update(1, {"loss": 5.0}, logged=False)
    clock.now += 39 * 2.0
    progress.update(40, {"loss": 2.45123, "lr": 2.9e-3, "tokens_per_s": 41_234.0})
    progress.message("saved step_00000040")
    clock.now += 10.0
    progress.add_pause(10.0)  # the save
    clock.now += 20.0
    progress.update(
        50,
        {
            "train/loss": 2.4,
            "eval/loss": 2.3,
            "moe/layer1/load_imbalance": 1.2,
            "moe/layer2/load_imbalance": 1.35,
            "moe/layer1/aux_loss": 0.01,
            "moe/layer2/aux_loss": 0.02,
            "moe/layer1/z_loss": 0.0,
            "moe/layer2/z_loss": 0.0,
            "moe/layer1/dropped_tokens": 3.0,
            "moe/layer2/dropped_tokens": 4.0,
            "moe/layer1/bias_norm": 0.5,
        },
    )
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    # 2 s per step since step 1, 260 left; elapsed counts from `started`.
    assert lines[0] == "step  40/300 | loss 2.4512 | lr 2.9e-03 | 41.2k tok/s | elapsed 1m50s | eta 8m40s"
    assert lines[1] == "saved step_00000040"
    # The save's 10 s are not in the rate: (78 + 20) s for 49 steps, 250 left.
    assert lines[2] == "step  50/300 | loss 2.4000 | eval 2.3000 | elapsed 2m20s | eta 8m20s"
    # Worst layer's imbalance, mean aux over layers, z left out (off), dropped summed.
    assert lines[3] == "  moe | load max/mean 1.35 (layer 2) | aux 1.5e-02 | dropped 7"
    assert len(lines) == 4


def test_live_line_redraws_every_step_with_elapsed_time_and_an_eta_free_of_start_up(terminal):
    rng = random.Random()
    clock = FakeClock()
    started = clock.now
    clock.now += rng.uniform(60, 600)  # data and model before the console starts
    progress = Progress("auto", total_steps=100, started=started, file=terminal, clock=clock)
    assert progress.mode == "live"
    clock.now += rng.uniform(60, 600)  # the step-0 evaluation
    clock.now += rng.uniform(30, 300)  # the first step, compiling
    progress.update(1, {"loss": 5.0, "lr": 1e-4, "tokens_per_s": 100.0}, logged=False)
    seconds = rng.uniform(0.2, 5.0)
    losses = {step: rng.uniform(1, 5) for step in range(2, 8)}
    for step, loss in losses.items():
        clock.now += seconds
        progress.update(step, {"loss": loss, "lr": 1e-3, "tokens_per_s": 2000.0}, logged=False)
    progress.close()

    by_step = dict(zip(terminal.drawn_steps(), terminal.drawn_lines(), strict=True))
    assert sorted(by_step) == list(range(1, 8))  # every step redrawn
    assert "eta" not in by_step[1]  # no rate yet
    for step, loss in losses.items():
        line = by_step[step]
        assert f"loss {loss:.4f}" in line and "2.0k tok/s" in line
        assert f"elapsed {format_duration(clock.now - started - (7 - step) * seconds)}" in line
        # The rate is that of the steps since the first: start-up, evaluation and compilation are left out.
        assert line.endswith(f"eta {format_duration((100 - step) * seconds)}")


def test_live_line_redraws_at_most_every_tenth_of_a_second_between_log_intervals(terminal):
    clock = FakeClock()
    progress = Progress("live", total_steps=1000, file=terminal, clock=clock)
    for step in range(1, 101):
        clock.now += 0.004
        progress.update(step, {"loss": 2.0}, logged=step == 100)
    progress.close()
    steps = terminal.drawn_steps()
    assert 4 <= len(set(steps)) <= 6  # 0.4 s of steps: the first, one per 0.1 s, the logged one
    assert steps[0] == 1 and steps[-1] == 100


def test_an_evaluation_keeps_the_live_line_fields(terminal):
    clock = FakeClock()
    progress = Progress("live", total_steps=10, file=terminal, clock=clock)
    progress.update(5, {"loss": 2.5, "lr": 1e-3, "moe/layer0/load_imbalance": 1.5})
    progress.update(5, {"eval/loss": 2.25})
    clock.now += 1.0
    progress.update(6, {"loss": 2.4}, logged=False)
    progress.close()
    lines = terminal.drawn_lines()
    assert "loss 2.5000 | lr 1.0e-03" in lines[0]
    assert "loss 2.5000 | eval 2.2500 | lr 1.0e-03" in lines[1]
    assert "loss 2.4000 | eval 2.2500 | lr 1.0e-03" in lines[2]
    assert terminal.getvalue().count("load max/mean 1.50") >= 3


def test_eta_counts_only_this_process_steps():
    clock = FakeClock()
    progress = Progress("none", total_steps=1000, clock=clock)
    assert progress.eta_seconds(900) is None
    clock.now += 20.0
    progress.update(901, {}, logged=False)  # a resumed run's first step
    assert progress.eta_seconds(901) is None
    clock.now += 5.0
    # 5 s for 10 steps; 89 left (not the time since construction, nor the 900 earlier steps).
    assert progress.eta_seconds(911) == pytest.approx(44.5)


def test_none_mode_is_silent_and_auto_is_plain_off_a_terminal(capsys):
    quiet = Progress("none", total_steps=10)
    quiet.update(1, {"loss": 1.0})
    quiet.message("hello")
    assert capsys.readouterr().out == ""
    assert Progress("auto", total_steps=10).mode == "plain"
    with pytest.raises(ValueError, match="progress mode"):
        Progress("fancy", total_steps=10)


def test_live_mode_draws_and_prints_messages():
    import io

    buffer = io.StringIO()
    progress = Progress("live", total_steps=100, file=buffer)
    progress.update(10, {"loss": 1.5, "moe/layer0/aux_loss": 0.01})
    progress.message("checkpoint saved")
    progress.close()
    text = buffer.getvalue()
    assert "checkpoint saved" in text and "step  10/100" in text and "loss 1.5000" in text and "moe" in text


def test_formatters():
    assert format_duration(45) == "45s"
    assert format_duration(62) == "1m02s"
    assert format_duration(2 * 3600 + 3 * 60) == "2h03m"
    assert format_duration(28 * 3600) == "1d04h"
    assert format_rate(950) == "950" and format_rate(41_234) == "41.2k" and format_rate(1_234_000) == "1.23M"
    assert format_moe({"loss": 1.0}) is None
    assert format_moe({"moe/z_loss": 3.4e-4, "moe/dropped_tokens": 0.0}) == "  moe | z 3.4e-04 | dropped 0"
