"""sparsetron: the repository root is the package (see DESIGN.md, Layout)."""

from setuptools import find_packages, setup

SUBPACKAGES = find_packages(exclude=["tests", "tests.*", "benchmarks", "benchmarks.*", "experiments", "experiments.*"])

setup(
    name="sparsetron",
    version="0.1.0",
    description="Distributed training of sparse Mixture-of-Experts and long-context language models",
    python_requires=">=3.10",
    package_dir={"sparsetron": "."},
    packages=["sparsetron"] + [f"sparsetron.{p}" for p in SUBPACKAGES],
    package_data={"sparsetron": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.8",
        "triton; platform_system == 'Linux'",
        "numpy",
        "pyyaml",
        "tensorboard",
        # parquet files and saved Hugging Face datasets (Arrow) for `prepare` and train-time data.
        "pyarrow",
        "megatron-core",
        "tokenizers",
        "rich",
        # `sparsetron convert` reads and writes Hugging Face checkpoints (model.safetensors);
        # transformers itself is not needed to convert, only to run the exported model.
        "safetensors",
        # Checkpoint checksums (XXH3): maintained, wheels for every platform, and hashing
        # outruns reading the file, so verifying a checkpoint costs about one read of it.
        "xxhash",
        # .zst corpora for `sparsetron prepare` (Python 3.11 has no zstd in its standard library).
        "zstandard",
        # `sparsetron plot` (PNGs of a run's curves, Agg backend): wheels for every platform.
        "matplotlib",
    ],
    extras_require={
        # wandb: the tests check offline logging (tests/unit/test_run_observability.py).
        "dev": ["pytest", "pytest-timeout", "ruff", "transformers", "datasets", "wandb"],
        # metrics.wandb: Weights & Biases logging beside TensorBoard.
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["sparsetron = sparsetron.launch.cli:main"]},
)
