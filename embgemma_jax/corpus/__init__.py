"""Embedding whole corpora: input readers, checksummed shards, and the resumable multi-host job."""

from embgemma_jax.corpus.job import embed_corpus
from embgemma_jax.corpus.readers import CorpusError, open_corpus
from embgemma_jax.corpus.shards import ShardError, read_embeddings

__all__ = ["CorpusError", "ShardError", "embed_corpus", "open_corpus", "read_embeddings"]
