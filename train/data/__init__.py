"""The data pipeline: tokenizers, sources, packing into windows, and batch loaders."""

from sparsetron.train.data.errors import DataError
from sparsetron.train.data.loader import Batch, TrainLoader, build_datasets, eval_batches
from sparsetron.train.data.packing import PackedDataset, split_train_val
from sparsetron.train.data.sources import Documents, load_documents, stdlib_files
from sparsetron.train.data.tokenizer import ByteTokenizer, HFTokenizer, TokenizerLike, build_tokenizer, token_dtype

__all__ = [
    "Batch",
    "ByteTokenizer",
    "DataError",
    "Documents",
    "HFTokenizer",
    "PackedDataset",
    "TokenizerLike",
    "TrainLoader",
    "build_datasets",
    "build_tokenizer",
    "eval_batches",
    "load_documents",
    "split_train_val",
    "stdlib_files",
    "token_dtype",
]
