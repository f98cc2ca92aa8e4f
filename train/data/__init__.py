"""The data pipeline: tokenizers, sources, packing into windows, and batch loaders.

Names are imported on first use, so that `prepare` and its worker processes, which need
only the tokenizer and the readers, never import torch.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "Batch": "batch",
    "TrainLoader": "loader",
    "build_datasets": "loader",
    "build_training_data": "loader",
    "TrainingData": "loader",
    "BlendLoader": "blend",
    "eval_batches": "loader",
    "DataError": "errors",
    "PackedDataset": "packing",
    "split_train_val": "packing",
    "Documents": "sources",
    "load_documents": "sources",
    "stdlib_files": "sources",
    "ByteTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "TokenizerLike": "tokenizer",
    "build_tokenizer": "tokenizer",
    "token_dtype": "tokenizer",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
