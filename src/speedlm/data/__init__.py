"""Data layer: corpora -> tokenizers -> token streams, plus the MQAR synthetic task.

    corpus = load_corpus(None)                       # stdlib source, deterministic split
    tok = make_tokenizer("bpe", corpus, 4096)         # trained once, then cached
    train_ids, val_ids = encode_corpus(corpus, tok)   # cached .npy for BPE
    x, y = TokenStream(train_ids).batch(step, batch_size, seq_len, seed)
"""

from speedlm.data.cachedir import default_cache_dir
from speedlm.data.corpus import (
    FILE_SEPARATOR,
    Corpus,
    hf_corpus,
    is_val_file,
    load_corpus,
    stdlib_corpus,
    text_corpus,
)
from speedlm.data.dataset import TokenStream, encode_corpus, encode_split, iter_eval_batches, require_tokens
from speedlm.data.mqar import IGNORE_INDEX, MQARStream, mqar_accuracy, mqar_batch
from speedlm.data.tokenizers import (
    DEFAULT_BPE_VOCAB,
    TOKENIZER_KINDS,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    ids_dtype,
    load_tokenizer,
    make_tokenizer,
    train_bpe,
)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "DEFAULT_BPE_VOCAB",
    "FILE_SEPARATOR",
    "IGNORE_INDEX",
    "MQARStream",
    "TOKENIZER_KINDS",
    "TokenStream",
    "Tokenizer",
    "default_cache_dir",
    "encode_corpus",
    "encode_split",
    "hf_corpus",
    "ids_dtype",
    "is_val_file",
    "iter_eval_batches",
    "load_corpus",
    "load_tokenizer",
    "make_tokenizer",
    "require_tokens",
    "mqar_accuracy",
    "mqar_batch",
    "stdlib_corpus",
    "text_corpus",
    "train_bpe",
]
