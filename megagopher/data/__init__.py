"""Data pipeline: byte-level BPE tokenizer, Megatron's indexed dataset format, GPT samples, blending.

    from megagopher.data import IndexedDataset, build_gpt_datasets
    from megagopher.data.tokenizer import load_tokenizer
"""
from .blended_dataset import BlendedDataset
from .builder import build_gpt_datasets, global_batch, parse_split, split_document_ranges
from .errors import DataError, MissingDataFile, MissingTokenizerFile, TokenizerError
from .gpt_dataset import GPTDataset
from .indexed_dataset import IndexedDataset, IndexedDatasetBuilder

__all__ = ["BlendedDataset", "DataError", "GPTDataset", "IndexedDataset", "IndexedDatasetBuilder", "MissingDataFile",
           "MissingTokenizerFile", "TokenizerError", "build_gpt_datasets", "global_batch", "parse_split",
           "split_document_ranges"]
