"""Our masks against transformers' own mask construction for bidirectional Gemma 3."""

import numpy as np
import pytest
import torch
from transformers import Gemma3TextConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay

from embgemma_jax.masks import attention_mask


def _reference_masks(sliding_window: int, valid: np.ndarray) -> dict[str, np.ndarray]:
    config = Gemma3TextConfig(
        vocab_size=16,
        hidden_size=6,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=2,
        sliding_window=sliding_window,
        use_bidirectional_attention=True,
        layer_types=["sliding_attention", "full_attention"],
    )
    config._attn_implementation = "eager"
    b, t = valid.shape
    kwargs = dict(
        config=config,
        inputs_embeds=torch.zeros(b, t, 6),
        attention_mask=torch.tensor(valid, dtype=torch.long),
        past_key_values=None,
        position_ids=torch.arange(t)[None],
    )
    full = create_causal_mask(**kwargs, or_mask_function=lambda *a: torch.tensor(True))
    sliding = create_sliding_window_causal_mask(
        **kwargs, or_mask_function=_bidirectional_window_overlay(config.sliding_window)
    )
    # eager masks are additive floats [B, 1, T, S]: 0 where visible.
    return {"full": (full[:, 0] == 0).numpy(), "sliding": (sliding[:, 0] == 0).numpy()}


@pytest.mark.parametrize("sliding_window", [16, 512])
def test_masks_match_transformers(sliding_window):
    t = 40 if sliding_window == 16 else 600
    lengths = [t, t - 3, 9, 1]
    valid = np.array([[i < n for i in range(t)] for n in lengths])
    ref = _reference_masks(sliding_window, valid)
    radius = sliding_window // 2
    ours_full = np.asarray(attention_mask(valid, None))
    ours_sliding = np.asarray(attention_mask(valid, radius))
    # Compare on real query rows (transformers may treat fully padded query rows differently).
    rows = valid
    np.testing.assert_array_equal(ours_full[rows], ref["full"][rows])
    np.testing.assert_array_equal(ours_sliding[rows], ref["sliding"][rows])
    # The window is |i - j| <= sliding_window // 2 (a query sees at most 2 * radius + 1 keys).
    assert ours_sliding[0].sum(axis=1).max() == 2 * radius + 1
