#!/usr/bin/env python
"""Convert a sentence-transformers EmbeddingGemma checkpoint into the embgemma_jax format.

    python conversion/convert_checkpoint.py google/embeddinggemma-300m ./embeddinggemma-300m-jax
    python conversion/convert_checkpoint.py /path/to/local/st_dir ./out

The source is a local directory or a Hugging Face Hub id. The output holds ``embgemma_config.json``,
``params.safetensors`` (float32, our layout) and the tokenizer files; ``EmbeddingGemma.from_pretrained``
loads it. Same as ``embgemma-jax convert SRC OUT``.
"""

import sys

from embgemma_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
