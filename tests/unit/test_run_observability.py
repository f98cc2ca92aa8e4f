"""What a run shows and records beside its metrics files: the live console redrawn after every
step, a torch.profiler trace of metrics.profile_steps, and Weights & Biases logs (offline).

One short run that stops early and its resumption are shared by the tests below."""

import json
import struct
import sys
import warnings

import pytest
import torch
from fake_terminal import FakeTerminal

from sparsetron.launch.cli import main
from sparsetron.model.config import ConfigError
from sparsetron.train import progress as progress_module
from sparsetron.train.config import MetricsConfig
from sparsetron.train.config_io import load_job_config
from sparsetron.train.metrics import MetricsLogger
from sparsetron.train.profiling import StepProfiler
from sparsetron.train.trainer import Trainer
from sparsetron.train.wandb_run import ID_FILE

SHORT = [
    "data.max_documents=40",
    "trainer.steps=4",
    "trainer.eval_batches=1",
    "trainer.eval_interval=0",
    "schedule.warmup_steps=1",
    "checkpoint.interval=0",
    "metrics.log_interval=2",
    "metrics.console=live",
]


def wandb_in(folder, monkeypatch):
    """W&B's files (runs, settings, caches) in `folder`, no API key, and its console quiet."""
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setenv("NETRC", str(folder / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_teardown():
    """Wait for wandb's service process to write its files and stop it: the next run starts
    another, which reads the environment again (one process's settings are read once)."""
    import wandb

    wandb.teardown()


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    wandb_in(tmp_path / "wandb", monkeypatch)
    yield tmp_path / "wandb"
    wandb_teardown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Steps 1-3 (stopped at 3, profiling steps 2-3), then the resumed step 4, logging to W&B offline;
    the console of each on a fake terminal, redrawn after every step however fast the step."""
    tmp = tmp_path_factory.mktemp("observed")
    run_dir, wandb_dir = tmp / "run", tmp / "wandb"
    consoles = []
    with pytest.MonkeyPatch.context() as mp:
        wandb_in(wandb_dir, mp)
        mp.setenv("WANDB_MODE", "offline")
        mp.setattr(progress_module, "REDRAW_SECONDS", 0.0)
        results = []
        for extra, resume in ((["trainer.stop_at=3"], None), ([], "auto")):
            consoles.append(FakeTerminal(mp))
            mp.setattr(sys, "stdout", consoles[-1])
            job = load_job_config(
                "debug-dense",
                [*SHORT, f"trainer.run_dir={run_dir}", "metrics.profile_steps=[2, 3]", "metrics.wandb=true", *extra],
            )
            results.append(Trainer(job, resume=resume).run())
        wandb_teardown()
    return run_dir, wandb_dir, consoles, results


def test_the_live_console_redraws_every_step_and_metrics_are_written_per_log_interval(runs):
    run_dir, _, consoles, _ = runs
    assert consoles[0].drawn_steps()[:3] == [1, 2, 3] and set(consoles[1].drawn_steps()) == {4}
    assert all("elapsed" in line for console in consoles for line in console.drawn_lines())
    # Step 1 is drawn but not logged (metrics.log_interval=2; 3 is where the first run stops).
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 3, 4, 4]


def test_profile_steps_write_a_chrome_trace_of_those_steps(runs):
    run_dir, _, consoles, _ = runs
    trace = run_dir / "profile" / "rank0_steps2-3.pt.trace.json"
    assert f"profile of steps 2-3 written to {trace}: open it in ui.perfetto.dev" in consoles[0].getvalue()
    events = json.loads(trace.read_text())["traceEvents"]
    names = {event.get("name", "") for event in events}
    # The warm-up step (1) is not recorded; 2 and 3 are, as the profiler's steps 1 and 2.
    assert {"ProfilerStep#1", "ProfilerStep#2"} <= names and "ProfilerStep#0" not in names
    assert any(name.startswith("aten::") for name in names)
    # The resumed run is past the range: it says so and writes nothing.
    assert "metrics.profile_steps=[2, 3]: resumed at step 3, profiling none of them" in consoles[1].getvalue()
    assert [p.name for p in trace.parent.iterdir()] == [trace.name]


def test_no_trace_without_profile_steps(tmp_path):
    profiler = StepProfiler([], 0, tmp_path, torch.device("cpu"), 0, 1)
    for step in (1, 2, 3):
        profiler.before_step(step)
        torch.ones(8).sum()
        assert profiler.after_step(step) is None
    profiler.close()
    assert profiler.window is None and not (tmp_path / "profile").exists()


def test_a_resumed_run_profiles_the_rest_of_the_range(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "won't be using warmup" warning
        profiler = StepProfiler([2, 5], 3, tmp_path, torch.device("cpu"), 1, 2)
    assert profiler.window == (4, 5)
    assert profiler.notice == "metrics.profile_steps=[2, 5]: resumed at step 3, profiling steps 4-5"
    lines = []
    for step in (4, 5):
        profiler.before_step(step)
        torch.ones(8).sum()
        lines.append(profiler.after_step(step))
    trace = tmp_path / "profile" / "rank1_steps4-5.pt.trace.json"
    assert lines == [
        None,
        f"profile of steps 4-5 written to {trace} and one file per other rank: open it in ui.perfetto.dev",
    ]
    assert json.loads(trace.read_text())["traceEvents"]


@pytest.mark.parametrize("steps", [[3, 2], [0, 1], [2], [1, 2, 3], [5, 21]])
def test_profile_steps_are_checked(steps):
    with pytest.raises(
        ConfigError, match=r"metrics.profile_steps: must be \[first, last\] with 1 <= first <= last <= trainer.steps=20"
    ):
        load_job_config("debug-dense", [f"metrics.profile_steps={steps}"])


def wandb_records(path):
    """The records of a complete .wandb file: W&B's record log (LevelDB's log format: 32 KiB blocks of
    checksum, length and type headers) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_folder):
    """{step: {name: value}} of the scalars logged in one offline run folder."""
    (log,) = run_folder.glob("run-*.wandb")
    history = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return history


def test_wandb_offline_holds_the_scalars_and_a_resumed_run_continues_the_same_run(runs):
    run_dir, wandb_dir, _, results = runs
    run_id = (run_dir / ID_FILE).read_text().strip()
    folders = sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2  # the first run and its resumption, under one W&B id
    first, resumed = (wandb_history(folder) for folder in folders)
    assert sorted(first) == [0, 2, 3] and sorted(resumed) == [4]
    assert first[0] == {"eval/loss": pytest.approx(results[0].eval_losses[0])}
    assert first[3]["loss"] == pytest.approx(results[0].losses[3])
    assert resumed[4]["loss"] == pytest.approx(results[1].losses[4])
    assert resumed[4]["eval/loss"] == pytest.approx(results[1].eval_losses[4])
    logged = {
        json.loads(line)["step"]: json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    }
    # The same scalars as TensorBoard and metrics.jsonl.
    assert set(first[2]) == set(logged[2]) - {"step", "time"}


def test_wandb_without_the_package_is_refused_before_anything_is_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an install without wandb imports
    code = main(["train", "debug-dense", "--set", f"trainer.run_dir={tmp_path / 'run'}", "--set", "metrics.wandb=true"])
    assert code == 2
    assert capsys.readouterr().err == (
        "error: metrics.wandb=true needs the wandb package: pip install 'sparsetron[wandb]' "
        "(or pip install wandb), or set metrics.wandb=false\n"
    )
    assert not (tmp_path / "run").exists()


def test_wandb_mode_offline_wins_over_the_environment(tmp_path, wandb_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg = MetricsConfig(tensorboard=False, jsonl=False, wandb=True, wandb_mode="offline")
    with MetricsLogger(cfg, tmp_path / "run") as logger:
        logger.log(1, {"loss": 2.5})
    wandb_teardown()
    (folder,) = (wandb_dir / "wandb").glob("offline-run-*")
    assert wandb_history(folder) == {1: {"loss": 2.5}}


def test_wandb_that_cannot_start_says_how_to_log_offline(tmp_path, wandb_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")  # and no API key
    with pytest.raises(
        ConfigError,
        match=r"^metrics.wandb: W&B did not start a run \(.*API key.*\); log in with `wandb login`, or log offline with WANDB_MODE=offline or metrics.wandb_mode=offline$",
    ):
        MetricsLogger(MetricsConfig(wandb=True), tmp_path / "run")
    assert not (tmp_path / "run" / "tensorboard").exists()
