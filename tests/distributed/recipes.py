"""Model settings the distributed tests share, taken from the shipped recipes."""

from dataclasses import asdict

from sparsetron.train.config_io import load_job_config


def recipe_moe(recipe: str, **overrides) -> dict:
    """The `moe` section of `recipe` as MoEConfig keywords, with `overrides` (e.g. fewer experts)."""
    return {**asdict(load_job_config(recipe).moe), **overrides}
