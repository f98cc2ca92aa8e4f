"""The `sparsetron` command line.

    sparsetron train tiny                              # train a shipped recipe
    sparsetron train my.yaml --set trainer.steps=50    # a file, with overrides
    sparsetron train tiny --resume auto                # continue from the latest checkpoint
    sparsetron config tiny --set moe.top_k=4           # print the resolved config
    sparsetron config tiny --get trainer.run_dir       # print one resolved value (for scripts)
    sparsetron config --doc                            # every key, its default and meaning
    sparsetron plan tiny --nproc 4 --set parallel.tensor=2   # layout, parameters, batch, memory: a dry run
    sparsetron eval runs/tiny                          # loss and perplexity of its latest checkpoint
    sparsetron plot runs/tiny                          # PNGs of its curves and expert loads (runs/tiny/plots)
    sparsetron recipes                                 # the shipped recipes
    sparsetron convert --from HF_DIR --to CKPT_DIR --format sparsetron   # import a Hugging Face checkpoint
    sparsetron convert --from CKPT_DIR --to HF_DIR --format hf           # export one
    sparsetron upcycle --from DENSE --recipe tiny --out DIR              # dense checkpoint -> MoE step 0
    sparsetron train tiny --resume DIR                                   # continue the upcycled MoE
    sparsetron upcycle --from DENSE --recipe tiny --out DIR --continue   # MoE at the dense step: same schedule, next data
    sparsetron prune --from runs/tiny --keep 8 --out runs/tiny-e8            # keep the 8 most used experts
    sparsetron generate runs/tiny --prompt "def " --max-new-tokens 200      # sample from a checkpoint
    sparsetron prepare --input 'c4/*.jsonl.zst' --tokenizer tok/ --out data/c4 --workers 16   # tokenize a corpus
    launch/torchrun.sh 2 tiny --set parallel.data_parallel_shard=2   # FSDP over 2 processes

Bad input (config, data, checkpoint) prints one `error:` message and exits with status 2.

Exit statuses of `sparsetron train`, as a scheduler sees them:

    0    finished trainer.steps, or stopped with a checkpoint to resume from: at trainer.stop_at,
         at trainer.max_hours or by SIGUSR1 (SLURM's warning); <run_dir>/status.json says which
    1    failed while training: out of memory, a diverged loss (trainer.max_nonfinite_steps), a
         lost or hung rank (parallel.step_timeout_s), or an unexpected error (with its traceback)
    2    bad input: config, data, checkpoint, or a memory plan larger than the device (--force
         starts anyway)
    130  stopped by Ctrl-C (SIGINT): saved at the end of the step (resume with --resume auto), or,
         after a second Ctrl-C during the save, not saved (earlier checkpoints are intact)
    143  stopped by SIGTERM, saved at the end of the step

Under torchrun a rank exits 0 after a stop by a signal that it saved for, so that torchrun does not
restart the group (SPARSETRON_MAX_RESTARTS) for it. launch/torchrun.sh (`python -m
sparsetron.launch.torchrun`, also started by launch/slurm_node.sh) exits with the status of the
rank that failed first, after one `error:` line naming it (a rank killed by signal N: 128 + N),
or with 128 + N when it was stopped by signal N itself (Ctrl-C 130, SIGTERM 143), after the ranks
saved.

On a CPU, `train` runs with torch's transparent-huge-page allocator (THP_MEM_ALLOC_ENABLE=1,
see `use_cpu_huge_pages`); THP_MEM_ALLOC_ENABLE=0 in the environment opts out.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from sparsetron.launch.failures import report
from sparsetron.model.config import ConfigError
from sparsetron.train.config_io import describe, dump_yaml, load_job_config, recipe_names
from sparsetron.train.data.skipped import MAX_SKIPPED_FRACTION

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
# A stop by one of these signals that saved exits 128 + the signal's number, like a shell's status
# for a process the signal ended; a stop by SIGUSR1 or by a limit exits 0 (see the table above).
STOPPED_BY_SIGNAL = {"signal SIGINT": 128 + signal.SIGINT, "signal SIGTERM": 128 + signal.SIGTERM}
EXIT_INTERRUPTED = STOPPED_BY_SIGNAL["signal SIGINT"]
THP_VAR = "THP_MEM_ALLOC_ENABLE"


def _add_set_arg(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable `--set SECTION.KEY=VALUE` of every command that reads a config."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def _add_config_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "config",
        nargs=None if required else "?",
        metavar="CONFIG_OR_NAME",
        help=f"a YAML file or a shipped recipe ({', '.join(recipe_names())})",
    )
    _add_set_arg(parser, "override one config value (repeatable); the value is read as YAML")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsetron",
        description="Train fine-grained Mixture-of-Experts and long-context language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model from a recipe", description="Train a model.")
    _add_config_args(train, required=True)
    train.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from the latest complete checkpoint (auto) or from a checkpoint folder",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="start even when the memory plan exceeds the device's available memory (warns instead)",
    )
    train.add_argument(
        "--dry-run", action="store_true", help="print the plan for WORLD_SIZE processes (as `plan`) and stop"
    )

    plan = commands.add_parser(
        "plan",
        help="a dry run: layout, parameters, batch, FLOPs and memory per rank, without training",
        description="Resolve a config as `train` would for N processes and print its layout, parameters, "
        "batch, FLOPs per token and per-rank memory plan, without starting processes or allocating the model.",
    )
    _add_config_args(plan, required=True)
    plan.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="processes the run will have, its WORLD_SIZE (default 1)"
    )

    evaluate = commands.add_parser(
        "eval",
        help="loss and perplexity of a checkpoint on validation data",
        description="Evaluate a checkpoint (a step folder, or a run or checkpoint folder: its newest complete "
        "checkpoint) on its config's validation batches, or on --data files.",
    )
    evaluate.add_argument("checkpoint", metavar="CKPT", help="step folder, checkpoint folder or run folder")
    evaluate.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="validation files in the checkpoint config's data.source format (they become data.val_paths)",
    )
    evaluate.add_argument(
        "--batches", type=int, metavar="N", help="micro-batches to evaluate (default: trainer.eval_batches)"
    )
    _add_set_arg(evaluate, "override a value of the checkpoint's config (repeatable), e.g. trainer.device=cpu")

    plot = commands.add_parser(
        "plot",
        help="PNGs of a run's loss, learning rate, gradient norm and expert load",
        description="Draw a run's metrics.jsonl: loss and eval loss, learning rate, gradient norm, and per "
        "MoE layer the expert load over steps.",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (trainer.run_dir), holding metrics.jsonl")
    plot.add_argument("--out", metavar="DIR", help="folder for the PNGs (default RUN_DIR/plots)")

    config = commands.add_parser(
        "config", help="print a resolved config, or document every key", description="Print a resolved config."
    )
    _add_config_args(config, required=False)
    config.add_argument("--doc", action="store_true", help="list every key with its default and meaning")
    config.add_argument(
        "--get",
        dest="keys",
        action="append",
        default=[],
        metavar="SECTION.KEY",
        help="print only this resolved value, one line per --get (repeatable; for scripts)",
    )

    commands.add_parser("recipes", help="list the shipped recipes", description="List the shipped recipes.")

    prepare = commands.add_parser(
        "prepare",
        help="tokenize a corpus into Megatron's indexed .bin/.idx format",
        description="Tokenize text, jsonl (.gz, .zst), parquet or a saved Hugging Face dataset into Megatron's "
        "indexed format, streaming, with N worker processes. Train on it with data.source=megatron.",
    )
    prepare.add_argument(
        "--input",
        dest="inputs",
        action="append",
        required=True,
        nargs="+",
        metavar="GLOB",
        help="files, globs or dataset folders, read in the order given (each glob sorted); repeatable",
    )
    prepare.add_argument(
        "--tokenizer", required=True, metavar="PATH|byte", help="tokenizer.json (or its folder), or byte"
    )
    prepare.add_argument(
        "--out",
        required=True,
        metavar="PREFIX",
        help="output prefix (writes PREFIX.bin and PREFIX.idx); a folder with --per-file",
    )
    prepare.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tokenizer processes (default: one per CPU; 0 = this process)",
    )
    prepare.add_argument(
        "--text-key", default="text", metavar="KEY", help="key of the text in jsonl, parquet and hf data"
    )
    prepare.add_argument(
        "--format",
        dest="fmt",
        default="auto",
        choices=("auto", "text", "jsonl", "parquet", "hf"),
        help="input format (auto: from each name; a folder is a saved Hugging Face dataset)",
    )
    skipping = prepare.add_mutually_exclusive_group()
    skipping.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip and count every malformed record, however many (--max-skipped-fraction 1)",
    )
    skipping.add_argument(
        "--max-skipped-fraction",
        type=float,
        default=MAX_SKIPPED_FRACTION,
        metavar="F",
        help="skip and count malformed records, failing an input where more than this share of its records are "
        f"(train's data.max_skipped_fraction, the same default {MAX_SKIPPED_FRACTION}; 0 = stop at the first)",
    )
    prepare.add_argument(
        "--text-documents",
        default="file",
        choices=("file", "paragraph", "line"),
        help="how a text file splits into documents: whole, at blank lines, or one per non-blank line "
        "(train's data.text_documents; default file)",
    )
    prepare.add_argument(
        "--per-file", action="store_true", help="one prefix per input, named after it, in the folder --out"
    )
    prepare.add_argument(
        "--progress",
        default="auto",
        choices=("auto", "live", "plain", "none"),
        help="progress line (auto: live on a terminal)",
    )

    convert = commands.add_parser(
        "convert",
        help="convert between Hugging Face and sparsetron checkpoints",
        description="Convert a checkpoint; the source format is detected, the target format is named.",
    )
    convert.add_argument("--from", dest="source", required=True, metavar="DIR", help="checkpoint folder to read")
    convert.add_argument("--to", dest="target", required=True, metavar="DIR", help="new (or empty) folder to write")
    convert.add_argument("--format", required=True, choices=("hf", "sparsetron"), help="format to write")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="tensor dtype of an hf export")
    _add_set_arg(
        convert, "sparsetron target: set a data/trainer/... value of its config.yaml (repeatable), as `train --set`"
    )

    upcycle = commands.add_parser(
        "upcycle",
        help="turn a dense checkpoint into the step-0 checkpoint of an MoE recipe",
        description="Upcycle a dense model into a fine-grained MoE that computes the same function "
        "(train it with `sparsetron train RECIPE --resume OUT`).",
    )
    upcycle.add_argument(
        "--from", dest="source", required=True, metavar="DENSE", help="sparsetron checkpoint or Hugging Face folder"
    )
    upcycle.add_argument("--recipe", required=True, metavar="CONFIG_OR_NAME", help="the MoE recipe to upcycle into")
    upcycle.add_argument("--out", required=True, metavar="DIR", help="new (or empty) checkpoint folder to write")
    _add_set_arg(upcycle, "override one value of the recipe (repeatable); give the same ones to `train`")
    upcycle.add_argument(
        "--router",
        choices=("auto", "virtual_groups", "zero"),
        default="auto",
        help="router init: virtual_groups (identical rows per copy), zero, or auto (whichever is exact)",
    )
    upcycle.add_argument(
        "--shared-fraction",
        type=float,
        default=0.5,
        metavar="B",
        help="share of the dense shards 0..n_shared-1 the shared experts carry (0 < B <= 1; default 0.5)",
    )
    upcycle.add_argument(
        "--allow-inexact",
        action="store_true",
        help="accept settings that do not preserve the dense function (each is warned about by name)",
    )
    upcycle.add_argument(
        "--continue",
        dest="continue_run",
        action="store_true",
        help="write the MoE at the dense checkpoint's step with its data position, so `train --resume` "
        "continues the dense run's schedule and reads its next batches (fresh optimizer; needs a sparsetron "
        "checkpoint with the recipe's data and global batch)",
    )

    prune = commands.add_parser(
        "prune",
        help="keep the most used routed experts of an MoE checkpoint (or merge the rest into them)",
        description="Measure each routed expert's usage (summed routing weight) on held-out data, keep the E' most "
        "used per MoE layer, optionally merge the others into them or route each token to fewer experts, and write "
        "a step-0 checkpoint (evaluate it with `sparsetron eval OUT`).",
    )
    prune.add_argument(
        "--from", dest="source", required=True, metavar="CKPT", help="step folder, checkpoint folder or run folder"
    )
    prune.add_argument("--keep", required=True, type=int, metavar="E'", help="routed experts to keep per MoE layer")
    prune.add_argument(
        "--top-k", type=int, metavar="K'", help="experts per token after pruning (default: unchanged, top_k x G)"
    )
    prune.add_argument(
        "--merge",
        action="store_true",
        help="merge each pruned expert into the kept one with the most similar router logits, weighted by usage",
    )
    prune.add_argument(
        "--batches", type=int, metavar="N", help="calibration micro-batches (default: trainer.eval_batches)"
    )
    prune.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="calibration files in data.source's format (default: the checkpoint config's validation split)",
    )
    prune.add_argument("--out", required=True, metavar="DIR", help="new (or empty) checkpoint folder to write")
    _add_set_arg(prune, "override a value of the checkpoint's config (repeatable); data.* ones only for calibration")

    generate = commands.add_parser(
        "generate",
        help="sample text from a checkpoint",
        description="Continue a prompt with a checkpoint's model: greedy at --temperature 0, else sampled.",
    )
    generate.add_argument("checkpoint", metavar="CKPT", help="step folder, checkpoint folder or run folder")
    generate.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to add (default 200)")
    generate.add_argument(
        "--temperature", type=float, default=0.8, metavar="T", help="softmax temperature; 0 = greedy (default 0.8)"
    )
    generate.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens only (0 = all)"
    )
    generate.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of the sampling (default 0)")
    _add_set_arg(generate, "override a value of the checkpoint's config (repeatable), e.g. trainer.device=cuda")
    return parser


def use_cpu_huge_pages(device: str) -> None:
    """Re-execute this command once with THP_MEM_ALLOC_ENABLE=1 when training on a CPU.

    On a CPU every tensor above the allocator's mmap threshold is mapped fresh from the OS (and
    its pages faulted in) at every step; with the variable set, torch backs large tensors with
    transparent huge pages, which made the MoE layer 1.7-1.9x faster at granularity 16. torch
    reads it once, at its first allocation (made while the trainer is imported, or here when
    "auto" asks torch about CUDA), so the process starts over with it set rather than setting it
    late. A value already there is respected (0 opts out), and the restarted process finds it
    set, so this runs at most once. Under torchrun each worker restarts in place (same process).
    """
    if THP_VAR in os.environ or device == "cuda":
        return
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return
    os.environ[THP_VAR] = "1"
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"sparsetron: restarting with {THP_VAR}=1 for a CPU run (set it to 0 to opt out)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _train(args: argparse.Namespace, restart: bool) -> int:
    # Imported here so that `sparsetron --help` and `config` stay fast.
    from sparsetron.train.checkpoint import CheckpointError
    from sparsetron.train.data import DataError
    from sparsetron.train.memory_fit import OutOfMemory
    from sparsetron.train.trainer import Trainer, TrainingDiverged
    from sparsetron.train.watchdog import CollectiveFailure

    try:
        job = load_job_config(args.config, args.overrides)
    except ConfigError as err:
        report(str(err), every_rank=True)  # the same command line on every rank
        return EXIT_BAD_INPUT
    try:
        if restart:
            use_cpu_huge_pages(job.trainer.device)
        result = Trainer(job, resume=args.resume, force=args.force).run()
    except (ConfigError, DataError, CheckpointError) as err:
        report(str(err))
        return EXIT_BAD_INPUT
    except CollectiveFailure as err:
        report(str(err), peer=True)
        return EXIT_FAILED
    except (TrainingDiverged, OutOfMemory) as err:
        report(str(err))
        return EXIT_FAILED
    except KeyboardInterrupt:
        # A second Ctrl-C (or one before training started): nothing was saved.
        report("interrupted: stopped without saving; earlier checkpoints are intact", error=False)
        return EXIT_INTERRUPTED
    except Exception as err:
        # A bug: its traceback follows; torchrun's launcher learns which rank it was.
        report(f"{type(err).__name__}: {err}", callstack=traceback.format_exc())
        raise
    if int(os.environ.get("RANK", "0")) == 0:
        final = result.eval_losses.get(result.step)
        summary = f"done: step {result.step}, {result.tokens_seen:,} tokens"
        if final is not None:
            summary += f", eval loss {final:.4f}"
        if result.checkpoint is not None:
            summary += f", checkpoint {result.checkpoint}"
        print(summary)
    return finished_status(result.stopped_by)


def finished_status(stopped_by: str | None) -> int:
    """The exit status of a run that ended with a save, by what stopped it (TrainResult.stopped_by)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return 0  # torchrun reports the signal it stopped the ranks with; a rank's own must not restart them
    return STOPPED_BY_SIGNAL.get(stopped_by, 0)


def _config(args: argparse.Namespace) -> int:
    if args.doc:
        for key, default, doc in describe():
            print(f"{key} = {default}\n    {doc}")
        return 0
    try:
        job = load_job_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.keys:
        print(dump_yaml(job), end="")
        return 0
    known = {key for key, _, _ in describe()}
    unknown = [key for key in args.keys if key not in known]
    if unknown:
        print(f"error: unknown key {unknown[0]} (sparsetron config --doc lists them)", file=sys.stderr)
        return EXIT_BAD_INPUT
    for key in args.keys:
        value = job
        for name in key.split("."):
            value = getattr(value, name)
        print(value)
    return 0


def _plan(args: argparse.Namespace, world_size: int) -> int:
    from sparsetron.train.data import DataError
    from sparsetron.train.plan import plan_job

    try:
        if world_size < 1:
            raise ConfigError(f"--nproc must be at least 1, got {world_size}")
        job = load_job_config(args.config, args.overrides)
        plan = plan_job(job, world_size)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"plan of {args.config} (nothing started, nothing allocated):")
    for line in plan.lines():
        print(f"  {line}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sparsetron.train.checkpoint import CheckpointError
    from sparsetron.train.data import DataError
    from sparsetron.train.evaluate import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, args.overrides, args.batches)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(result.describe())
    return 0


def _plot(args: argparse.Namespace) -> int:
    from sparsetron.train.plot import PlotError, plot_run

    try:
        written = plot_run(args.run_dir, args.out)
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for line in written.lines():
        print(line)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from sparsetron.model.hf import HFFormatError
    from sparsetron.train.checkpoint import CheckpointError
    from sparsetron.train.hf_convert import convert

    try:
        written = convert(args.source, args.target, args.format, args.dtype, args.overrides)
    except (ConfigError, HFFormatError, CheckpointError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {written}")
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    import warnings

    from sparsetron.model.hf import HFFormatError
    from sparsetron.model.upcycle import UpcycleError
    from sparsetron.train.checkpoint import CheckpointError
    from sparsetron.train.data import DataError
    from sparsetron.train.upcycle import upcycle_checkpoint

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the accepted inexact settings are printed below
            result = upcycle_checkpoint(
                args.source,
                args.recipe,
                args.out,
                args.overrides,
                allow_inexact=args.allow_inexact,
                router=args.router,
                shared_fraction=args.shared_fraction,
                continue_run=args.continue_run,
            )
    except (ConfigError, UpcycleError, HFFormatError, CheckpointError, DataError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    print(result.plan.describe())
    print(f"wrote {result.checkpoint}; continue with: sparsetron train {args.recipe} --resume {args.out}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from sparsetron.train.checkpoint import CheckpointError
    from sparsetron.train.data import DataError
    from sparsetron.train.prune import prune_checkpoint

    try:
        result = prune_checkpoint(
            args.source,
            args.out,
            args.keep,
            args.top_k,
            merge=args.merge,
            data_paths=args.data,
            overrides=args.overrides,
            batches=args.batches,
        )
    except (ConfigError, CheckpointError, DataError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(result.describe())
    print(f"wrote {result.checkpoint}; evaluate with: sparsetron eval {args.out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from sparsetron.train.checkpoint import CheckpointError
    from sparsetron.train.data import DataError
    from sparsetron.train.generate import generate_from_checkpoint

    try:
        text = generate_from_checkpoint(
            args.checkpoint,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            overrides=args.overrides,
        )
    except (ConfigError, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(text)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from sparsetron.train.data.errors import DataError
    from sparsetron.train.data.prepare import default_workers, prepare
    from sparsetron.train.data.tokenizer import build_tokenizer, token_dtype

    workers = default_workers() if args.workers is None else args.workers
    try:
        result = prepare(
            [path for group in args.inputs for path in group],
            args.tokenizer,
            args.out,
            workers=workers,
            text_key=args.text_key,
            fmt=args.fmt,
            max_skipped_fraction=1.0 if args.skip_bad_lines else args.max_skipped_fraction,
            text_documents=args.text_documents,
            per_file=args.per_file,
            progress=args.progress,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: the partial output was removed; nothing was written", file=sys.stderr)
        return 130
    print(result.summary(token_dtype(build_tokenizer(args.tokenizer).vocab_size)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs one command; argv None means this process's own command line, which `train` may
    re-execute (see `use_cpu_huge_pages`); a caller passing argv keeps its process."""
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.dry_run:
        from sparsetron.train.distributed import world_size_from_env

        return _plan(args, world_size_from_env())
    if args.command == "plan":
        return _plan(args, args.nproc)
    if args.command == "eval":
        return _eval(args)
    if args.command == "plot":
        return _plot(args)
    if args.command == "train":
        return _train(args, restart=argv is None)
    if args.command == "config":
        return _config(args)
    if args.command == "convert":
        return _convert(args)
    if args.command == "upcycle":
        return _upcycle(args)
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "prune":
        return _prune(args)
    if args.command == "generate":
        return _generate(args)
    print("\n".join(recipe_names()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
