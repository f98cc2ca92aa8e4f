"""The `sparsetron` command line.

    sparsetron train tiny                              # train a shipped recipe
    sparsetron train my.yaml --set trainer.steps=50    # a file, with overrides
    sparsetron train tiny --resume auto                # continue from the latest checkpoint
    sparsetron config tiny --set moe.top_k=4           # print the resolved config
    sparsetron config --doc                            # every key, its default and meaning
    sparsetron recipes                                 # the shipped recipes
    launch/torchrun.sh 2 tiny --set parallel.data_parallel_shard=2   # FSDP over 2 processes

Bad input (config, data, checkpoint) prints one `error:` message and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from sparsetron.model.config import ConfigError
from sparsetron.train.config_io import describe, dump_yaml, load_job_config, recipe_names

EXIT_BAD_INPUT = 2


def _add_config_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "config",
        nargs=None if required else "?",
        metavar="CONFIG_OR_NAME",
        help=f"a YAML file or a shipped recipe ({', '.join(recipe_names())})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable); the value is read as YAML",
    )


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

    config = commands.add_parser(
        "config", help="print a resolved config, or document every key", description="Print a resolved config."
    )
    _add_config_args(config, required=False)
    config.add_argument("--doc", action="store_true", help="list every key with its default and meaning")

    commands.add_parser("recipes", help="list the shipped recipes", description="List the shipped recipes.")
    return parser


def _train(args: argparse.Namespace) -> int:
    # Imported here so that `sparsetron --help` and `config` stay fast.
    from sparsetron.train.checkpoint import CheckpointError
    from sparsetron.train.data import DataError
    from sparsetron.train.trainer import Trainer, TrainingDiverged

    try:
        job = load_job_config(args.config, args.overrides)
        result = Trainer(job, resume=args.resume).run()
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A second Ctrl-C: the first one's save was abandoned; earlier checkpoints are intact.
        print("interrupted before the checkpoint was written; earlier checkpoints are intact", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    final = result.eval_losses.get(result.step)
    summary = f"done: step {result.step}, {result.tokens_seen:,} tokens"
    if final is not None:
        summary += f", eval loss {final:.4f}"
    if result.checkpoint is not None:
        summary += f", checkpoint {result.checkpoint}"
    print(summary)
    return 0


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
    print(dump_yaml(job), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "config":
        return _config(args)
    print("\n".join(recipe_names()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
