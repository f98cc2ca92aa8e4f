"""The data summary printed at start (TrainingData.summary): documents, tokens, the split, the epochs
that trainer.steps implies, records skipped; from the index alone, for one source and a blend."""

from __future__ import annotations

import json
import random

from sparsetron.train.config import DataConfig
from sparsetron.train.config_io import load_job_config
from sparsetron.train.data import ByteTokenizer, build_training_data
from sparsetron.train.data.prepare import prepare
from sparsetron.train.trainer import Trainer

BYTE = ByteTokenizer()


def jsonl(path, n_docs: int, n_missing: int, rng: random.Random) -> None:
    rows = [
        json.dumps({"text": "".join(rng.choice("abc \n") for _ in range(rng.randint(20, 90)))}) for _ in range(n_docs)
    ]
    rows += [json.dumps({"body": "x"})] * n_missing
    path.write_text("\n".join(rows) + "\n")


class Unreadable:
    """Stands in for a token array whose length is known but whose contents must not be read."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        raise AssertionError("the summary read tokens")


def unreadable(data) -> None:
    for split in data.sources:
        for ds in (split.train, split.val):
            if ds is not None:
                ds.tokens = Unreadable(len(ds.tokens))


def test_one_source(tmp_path):
    rng = random.Random()
    path = tmp_path / "c.jsonl"
    n_docs, n_missing = rng.randint(150, 250), rng.randint(1, 5)
    jsonl(path, n_docs, n_missing, rng)
    cfg = DataConfig(source="jsonl", paths=[str(path)], cache_dir=str(tmp_path / "cache"), seq_len=16)
    data = build_training_data(cfg, BYTE, micro_batch_size=2, n_eval=1)
    train, val = data.train[0], data.sources[0].val
    unreadable(data)
    steps, per_step = rng.randint(1, 10**6), rng.randint(1, 512)
    lines = data.summary(steps, per_step)
    assert train.n_documents + val.n_documents == n_docs
    tokens = train.n_tokens + val.n_tokens
    assert lines[0].startswith(f"data: jsonl ['{path}'] (tokenized in ")
    assert lines[0].endswith(
        f": {n_docs} documents, {tokens:,} tokens; train {train.n_documents} documents, {train.n_tokens:,} tokens, "
        f"{len(train):,} windows; validation {val.n_documents} documents, {val.n_tokens:,} tokens, {len(val):,} windows"
    )
    reads = steps * per_step
    assert lines[1].startswith(f"data: {steps:,} steps x {per_step:,} sequences = ")
    assert lines[1].endswith(f" of {len(train):,} training windows ({reads / len(train):.3g} epochs)")
    total = n_docs + n_missing
    assert lines[2:] == [
        f"data: skipped {n_missing} of {total} records ({n_missing} missing key 'text'):",
        f"data:   {path}: {n_missing} of {total} records ({n_missing} missing key 'text')",
    ]


def test_a_blend_has_a_line_per_source_and_the_total(tmp_path):
    rng = random.Random()
    prefixes = []
    for i in range(3):
        jsonl(tmp_path / f"s{i}.jsonl", rng.randint(40, 120), 0, rng)
        prepare([str(tmp_path / f"s{i}.jsonl")], "byte", str(tmp_path / f"s{i}"), workers=0, progress="none")
        prefixes.append(str(tmp_path / f"s{i}"))
    weights = [rng.uniform(0.5, 4) for _ in prefixes]
    cfg = DataConfig(source="megatron", blend=[[w, p] for w, p in zip(weights, prefixes, strict=True)], seq_len=16)
    cfg.val_fraction = 0.2
    data = build_training_data(cfg, BYTE, micro_batch_size=2, n_eval=1)
    unreadable(data)
    steps, per_step = rng.randint(1, 10**5), rng.randint(1, 64)
    lines = data.summary(steps, per_step)
    assert len(lines) == 4
    for line, split, w in zip(lines, data.sources, weights, strict=False):
        epochs = steps * per_step * w / sum(weights) / len(split.train)
        assert line.startswith(f"data: {split.name} (weight {w / sum(weights):.0%}): ")
        assert line.endswith(f"{len(split.val):,} windows; {epochs:.3g} epochs")
    windows = sum(len(t) for t in data.train)
    assert lines[3].endswith(
        f"of {windows:,} training windows of all sources ({steps * per_step / windows:.3g} epochs)"
    )


def test_the_trainer_prints_it_next_to_the_layout(tmp_path, capsys):
    job = load_job_config(
        "debug-dense",
        [
            "trainer.steps=1",
            "schedule.warmup_steps=0",
            "trainer.eval_batches=1",
            "data.max_documents=20",
            "data.seq_len=32",
            "metrics.console=plain",
            "metrics.tensorboard=false",
            f"trainer.run_dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(job)
    trainer.run()
    out = capsys.readouterr()
    text = out.out + out.err
    layout = text.index("layout: ")
    expected = trainer.data.summary(1, job.trainer.micro_batch_size)
    assert expected[0].startswith("data: stdlib") and len(expected) == 2  # stdlib skips nothing
    position = [text.index(line) for line in expected]
    assert layout < position[0] < position[1]
