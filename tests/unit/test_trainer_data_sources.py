"""The trainer on each non-default data route: local jsonl with a Hugging Face tokenizer,
and Megatron indexed data. Everything is made here; nothing is downloaded."""

import json
import math
import random
import warnings

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from sparsetron.train.config_io import load_job_config
from sparsetron.train.data import ByteTokenizer
from sparsetron.train.trainer import Trainer

WORDS = "alpha beta gamma delta expert router token shard mesh layer block".split()


def sentences(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(n)]


def run(tmp_path, *data_overrides, resume=None):
    job = load_job_config(
        "debug-deepseek",
        [
            "trainer.steps=6",
            "trainer.eval_interval=0",
            "schedule.warmup_steps=1",
            "data.seq_len=32",
            "data.val_fraction=0.1",
            "data.max_documents=0",
            "metrics.console=none",
            f"trainer.run_dir={tmp_path / 'run'}",
            *data_overrides,
        ],
    )
    trainer = Trainer(job, resume=resume)
    return trainer, trainer.run()


def test_jsonl_with_a_local_tokenizer_json(tmp_path):
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        sentences(300, seed=1), trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<|endoftext|>"])
    )
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": s, "id": i}) for i, s in enumerate(sentences(400, seed=2))))

    trainer, result = run(
        tmp_path,
        "data.source=jsonl",
        f"data.paths=[{corpus}]",
        "data.text_key=body",
        f"data.tokenizer={tokenizer_file}",
    )
    vocab = tokenizer.get_vocab_size()
    assert trainer.job.model.vocab_size == -(-vocab // 64) * 64
    assert trainer.tokenizer.eos_id == tokenizer.token_to_id("<|endoftext|>")
    assert result.step == 6 and all(math.isfinite(v) for v in result.losses.values())
    assert result.eval_losses[6] < result.eval_losses[0]


def test_megatron_indexed_data(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    byte = ByteTokenizer()
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for s in sentences(300, seed=3):
        builder.add_document(np.array([*byte.encode(s), byte.eos_id], dtype=np.uint16), [len(s) + 1])
    builder.finalize(prefix + ".idx")

    trainer, result = run(tmp_path, "data.source=megatron", f"data.paths=[{prefix}]")
    assert trainer.data.train[0].n_documents + trainer.data.val.n_documents == 300
    assert result.step == 6 and result.eval_losses[6] < result.eval_losses[0]


def test_a_blend_resumes_bitwise_and_logs_each_source(tmp_path, capsys):
    """data.blend of two prepared sources (one small enough to wrap), with mask_eos_target and
    separate validation files: stopped at step 3 and resumed, the losses are the straight run's."""
    from sparsetron.train.data.prepare import prepare

    texts = {
        "small": [" ".join(sentences(20, seed=1))[:199]],  # 200 tokens with its eos: 6 windows of 32
        "large": sentences(300, seed=2),
        "val": sentences(40, seed=3),
    }
    for name, docs in texts.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in docs))
        prepare([str(tmp_path / f"{name}.jsonl")], "byte", str(tmp_path / "data" / name), workers=0, progress="none")
    blend = f"data.blend=[[1, {tmp_path / 'data' / 'small'}], [1, {tmp_path / 'data' / 'large'}]]"
    common = [
        "data.source=megatron",
        blend,
        f"data.val_paths=[{tmp_path / 'data' / 'val'}]",
        "data.mask_eos_target=true",
        "metrics.log_interval=1",
        "checkpoint.interval=0",
    ]
    _, straight = run(tmp_path / "straight", *common)
    _, first = run(tmp_path / "split", *common, "trainer.stop_at=3")
    assert first.stopped_early
    _, resumed = run(tmp_path / "split", *common, "metrics.console=plain", resume="auto")
    assert {**first.losses, **resumed.losses} == straight.losses
    assert resumed.eval_losses[6] == straight.eval_losses[6]
    lines = [json.loads(line) for line in (tmp_path / "split" / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [line for line in lines if line["step"] == 6 and "loss" in line][-1]
    # 6 steps of micro_batch 4 x grad_accum 1: 24 windows of 32 tokens, half from `small`, which
    # runs out at its 7th draw (step 4, after the resume) and says so once.
    assert last["data/small/tokens"] == last["data/large/tokens"] == 12 * 32
    assert last["data/small/epochs"] == 2.0
    assert capsys.readouterr().out.count("blend source small ran out after 6 windows") == 1
