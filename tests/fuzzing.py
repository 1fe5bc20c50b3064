"""Hypothesis settings shared by the property-based tests.

By default (CI) every property test is derandomized: the same examples on every run, no example database,
so a failure reproduces exactly. ``EMBGEMMA_FUZZ_EXAMPLES=N`` switches to N fresh random examples per test
(use it locally to fuzz harder, e.g. ``EMBGEMMA_FUZZ_EXAMPLES=5000 pytest tests/test_tokenizer_fuzz.py``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("EMBGEMMA_FUZZ_EXAMPLES", "0") or 0)


def fuzz_settings(ci_examples: int) -> settings:
    """``ci_examples`` fixed examples by default; EMBGEMMA_FUZZ_EXAMPLES random ones when set."""
    return settings(
        max_examples=FUZZ_EXAMPLES or ci_examples,
        derandomize=not FUZZ_EXAMPLES,
        database=None,
        deadline=None,  # first calls compile; wall-clock deadlines would only make the tests flaky
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
