"""Checkpoints: the sentence-transformers layout and our converted format, read into parameter trees."""

from embgemma_jax.checkpoint.load import Checkpoint, convert, load_checkpoint, save_converted

__all__ = ["Checkpoint", "convert", "load_checkpoint", "save_converted"]
