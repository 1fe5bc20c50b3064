"""Research surface: pooling variants and intermediates, the float64 oracle, the parity report, evaluation."""

from embgemma_jax.research.oracle import OracleOutput, oracle_forward
from embgemma_jax.research.parity import parity_report
from embgemma_jax.research.variants import Capture, Intermediates

__all__ = ["Capture", "Intermediates", "OracleOutput", "oracle_forward", "parity_report"]
