"""Checkpoints, read into parameter trees.

* ``safetensors_file.py``: the safetensors reader (header parsed and checked once, before any data).
* ``sentence_transformers.py``: the layout on the Hub, converted tensor by tensor (the conversion table).
* ``converted.py``: our own format (``embgemma-jax convert``).
* ``placement.py``: storage dtype, int8 quantization and device placement as each tensor is read.
* ``load.py``: a path or Hub id -> the right format -> a :class:`Checkpoint`.
"""

from embgemma_jax.checkpoint.converted import save_converted
from embgemma_jax.checkpoint.load import convert, load_checkpoint, resolve
from embgemma_jax.checkpoint.sentence_transformers import backbone_table, read_st_config
from embgemma_jax.checkpoint.tree import Checkpoint

__all__ = ["Checkpoint", "backbone_table", "convert", "load_checkpoint", "read_st_config", "resolve", "save_converted"]
