"""embgemma_jax: EmbeddingGemma-300M in JAX/Flax with numerical parity to sentence-transformers."""

from embgemma_jax.checkpoint import Checkpoint, convert, load_checkpoint
from embgemma_jax.config import EMBEDDINGGEMMA_300M, MATRYOSHKA_DIMS, EmbeddingGemmaConfig
from embgemma_jax.corpus import embed_corpus, iter_embeddings, read_embeddings, read_manifest
from embgemma_jax.encode import EmbeddingGemma
from embgemma_jax.errors import CheckpointError
from embgemma_jax.model import EmbeddingGemmaModule, Encoder, EncoderOutput
from embgemma_jax.pooling import POOLING_MODES, PoolingSpec
from embgemma_jax.precision import PRECISIONS, quantize_embeddings
from embgemma_jax.research.evaluation import MTEBEncoder, evaluate_retrieval, evaluate_retrieval_files
from embgemma_jax.research.oracle import OracleOutput, oracle_forward
from embgemma_jax.research.parity import parity_report
from embgemma_jax.research.variants import Capture, Intermediates
from embgemma_jax.similarity import SIMILARITY_FN_NAMES, similarity, similarity_pairwise
from embgemma_jax.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "EMBEDDINGGEMMA_300M",
    "MATRYOSHKA_DIMS",
    "POOLING_MODES",
    "PRECISIONS",
    "SIMILARITY_FN_NAMES",
    "Capture",
    "Checkpoint",
    "CheckpointError",
    "EmbeddingGemma",
    "EmbeddingGemmaConfig",
    "EmbeddingGemmaModule",
    "Encoder",
    "EncoderOutput",
    "Intermediates",
    "MTEBEncoder",
    "OracleOutput",
    "PoolingSpec",
    "Tokenizer",
    "convert",
    "embed_corpus",
    "evaluate_retrieval",
    "evaluate_retrieval_files",
    "iter_embeddings",
    "load_checkpoint",
    "oracle_forward",
    "parity_report",
    "quantize_embeddings",
    "read_embeddings",
    "read_manifest",
    "similarity",
    "similarity_pairwise",
]
