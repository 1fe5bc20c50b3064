"""Embedding whole corpora: inputs (many files, local or behind fsspec), checksummed shards (npy or
Parquet), and the resumable multi-host job."""

from embgemma_jax.corpus.job import embed_corpus
from embgemma_jax.corpus.readers import CorpusError, open_corpus
from embgemma_jax.corpus.shards import ShardError, iter_embeddings, read_embeddings, read_manifest
from embgemma_jax.corpus.sources import Corpus

__all__ = [
    "Corpus",
    "CorpusError",
    "ShardError",
    "embed_corpus",
    "iter_embeddings",
    "open_corpus",
    "read_embeddings",
    "read_manifest",
]
