"""Data: tokenizers, text/jsonl readers, Megatron indexed datasets, the embedded corpus.

Importing this package is light (numpy only); torch, megatron.core, sentencepiece and
transformers are imported where they are used.
"""

from megapuzzle.data.corpus import (iter_stdlib_texts, python_version, stdlib_files, stdlib_relpaths,
                                    stdlib_root, stdlib_stats)
from megapuzzle.data.datasets import (DataError, IndexedDatasetWriter, PackedSequenceDataset, TokenStream,
                                      iter_documents, iter_jsonl_texts, open_indexed_dataset, read_dataset_meta,
                                      read_text_file, unigram_entropy, write_indexed_dataset)
from megapuzzle.data.prepare import add_cli_args, prepare_data, run_cli
from megapuzzle.data.tokenizer import (HFJsonTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer,
                                       pad_vocab_size, train_sentencepiece, verify_hf_tokenizer)

__all__ = [
    "iter_stdlib_texts", "python_version", "stdlib_files", "stdlib_relpaths", "stdlib_root", "stdlib_stats",
    "DataError", "IndexedDatasetWriter", "PackedSequenceDataset", "TokenStream", "iter_documents",
    "iter_jsonl_texts", "open_indexed_dataset", "read_dataset_meta", "read_text_file", "unigram_entropy",
    "write_indexed_dataset", "add_cli_args", "prepare_data", "run_cli", "HFJsonTokenizer",
    "SentencePieceTokenizer", "Tokenizer", "load_tokenizer", "pad_vocab_size", "train_sentencepiece",
    "verify_hf_tokenizer",
]
