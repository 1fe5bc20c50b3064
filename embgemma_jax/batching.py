"""The one batch planner: tokenized texts -> padded batches of a bounded set of shapes.

Every caller (``encode``, the pooling variants, the corpus job, the server) batches through
:func:`padded_batches`, so they all see the same length buckets, row counts and results.

* Lengths are padded up to a bucket of :data:`BUCKETS` (capped at ``max_seq_length``), rows to a power of
  two (at most ``batch_size``), so a model compiles a bounded number of programs however many distinct
  lengths it sees.
* Texts are sorted longest first inside a tokenization window of :func:`tokenize_window` texts, so memory
  does not grow with the input while similar lengths still share batches.
* With ``token_budget`` a batch holds as many texts as fit ``rows * padded_length <= token_budget``.
* Whatever ``batch_size`` or ``token_budget`` asks for, no batch holds more than :data:`MAX_BATCH_TOKENS`
  padded tokens (unless one text alone is longer): device memory stays bounded (a 100,000-row batch of
  short texts once took 15 GB of host memory on the CPU backend). Results do not depend on batch sizes.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# Sequence lengths are padded up to one of these (capped at max_seq_length), so a model compiles at most
# len(BUCKETS) programs per batch size however many distinct lengths it sees. Steps of at most 1.25x
# (8-token steps below 64, then four per doubling): a padded batch computes at most 1.25x its longest
# text. With steps of 1.5x, 48 mixed documents (10-600 tokens) at batch size 8 computed 1.42x their
# real tokens against 1.16x for each batch padded to its own longest text (benchmarks/profile_cpu.py).
BUCKETS = (
    16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
    1280, 1536, 1792, 2048,
)  # fmt: skip

# Row lengths of packed batches (capped at max_seq_length): rows hold several texts, so a coarse set costs
# little padding while keeping the number of packed programs (each ~15 s to compile on an H100) small.
PACK_BUCKETS = (256, 384, 512, 768, 1024, 1536, 2048)

# The most padded tokens (rows x padded length) one device batch holds: 64 rows of 2048 tokens. For the
# real model in float32 that is about 6 GB of activations plus 3 GB of global-layer attention scores.
MAX_BATCH_TOKENS = 131072

# Batch-invariant mode (see :func:`plan_invariant_batches`): the padded tokens of each batch, by default.
INVARIANT_BATCH_TOKENS = 256


def check_positive_int(value: Any, name: str, *, optional: bool = False) -> int | None:
    """``value`` as an int if it is a positive int (None too when ``optional``); raises naming ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        want = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return int(value)


def check_batching(batch_size: Any, token_budget: Any = None) -> None:
    """Raises on a batch_size that is not a positive int, or a token_budget that is neither that nor None."""
    check_positive_int(batch_size, "batch_size")
    check_positive_int(token_budget, "token_budget", optional=True)


def check_truncate_dim(truncate_dim: Any, full: int, trained: Sequence[int] = ()) -> int:
    """The number of leading dimensions to keep: ``full`` for None, else an int in [1, full]."""
    if truncate_dim is None:
        return full
    is_int = isinstance(truncate_dim, (int, np.integer)) and not isinstance(truncate_dim, bool)
    if not is_int or not 1 <= truncate_dim <= full:
        hint = f" (trained Matryoshka dims: {list(trained)})" if trained else ""
        raise ValueError(f"truncate_dim must be an int in [1, {full}]{hint}, got {truncate_dim!r}")
    return int(truncate_dim)


def bucket_lengths(max_len: int, buckets: Sequence[int] = BUCKETS) -> tuple[int, ...]:
    return tuple(sorted({b for b in buckets if b < max_len} | {max_len}))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"sequence of {n} tokens is longer than the largest bucket {buckets[-1]}")


def batch_rows(n: int, batch_size: int) -> int:
    """Rows to pad a batch of n texts to: a power of two, at most batch_size (bounded compile count)."""
    rows = 1
    while rows < n:
        rows *= 2
    return min(rows, batch_size) if n <= batch_size else n


def tokenize_window(batch_size: int, token_budget: int | None) -> int:
    """Texts tokenized (and sorted by length) at a time: enough for several full batches."""
    batch_size = min(batch_size, MAX_BATCH_TOKENS // BUCKETS[0])
    budget = MAX_BATCH_TOKENS if token_budget is None else min(token_budget, MAX_BATCH_TOKENS)
    return max(batch_size * 16, 4 * budget // 16 if token_budget is not None else 256)


def tokenized_windows(tokenizer: Any, texts: Sequence[str], window: int) -> Iterator[tuple[int, list[list[int]]]]:
    """(start, token ids) of each window of ``window`` texts. The next window is tokenized in a background
    thread while the caller works on this one (SentencePiece releases the GIL), so tokenization overlaps
    batch assembly and device dispatch. At most two windows are held at once."""
    starts = range(0, len(texts), window)
    if len(starts) <= 1:
        for start in starts:
            yield start, tokenizer.encode(texts[start : start + window])
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embgemma-tokenize") as pool:
        pending = pool.submit(tokenizer.encode, texts[0:window])
        for start in starts:
            ids = pending.result()
            nxt = start + window
            if nxt < len(texts):
                pending = pool.submit(tokenizer.encode, texts[nxt : nxt + window])
            yield start, ids


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """One batch: which texts (positions in the planned list), padded to ``length`` tokens and ``rows`` rows."""

    indices: np.ndarray
    length: int
    rows: int


def plan_batches(lengths: Sequence[int], batch_size: int, token_budget: int | None, max_len: int) -> list[BatchPlan]:
    """Groups texts (longest first) into batches padded to the bucket of their longest text.

    With ``token_budget`` a batch holds as many texts as fit ``rows * padded_length <= token_budget`` (at
    most batch_size), so long texts go in small batches and short ones in large batches.

    Fewer texts than a full batch are left at the end: they go in batches of the largest power of two
    that they fill (6 texts at batch size 8: 4 + 2), not in one batch padded with empty rows (8 rows for
    6 texts computed 1.33x the real tokens on 2048-token documents). The row counts are the powers of two
    that padding to one would use, so the set of compiled shapes does not grow.
    """
    buckets = bucket_lengths(max_len)
    order = np.argsort([-n for n in lengths], kind="stable")
    plan, i = [], 0
    while i < len(order):
        length = bucket_for(lengths[order[i]], buckets)
        budget = MAX_BATCH_TOKENS if token_budget is None else min(token_budget, MAX_BATCH_TOKENS)
        rows = max(1, min(batch_size, budget // length))
        left = len(order) - i
        if left < rows:
            rows = 1 << (left.bit_length() - 1)  # the largest power of two <= left
        sel = order[i : i + rows]
        plan.append(BatchPlan(sel, length, len(sel)))  # a full batch, or a power of two: no empty rows
        i += len(sel)
    return plan


def invariant_rows(length: int, batch_tokens: int) -> int:
    """The rows of every batch-invariant batch of padded ``length``: as many as fit ``batch_tokens``, at
    least one."""
    return max(1, batch_tokens // length)


def plan_invariant_batches(lengths: Sequence[int], batch_tokens: int, max_len: int) -> list[BatchPlan]:
    """The batch-invariant plan: a text's vector depends on the text alone, bit for bit, not on what it
    is encoded with (the order, the batch size, the other texts, other requests of a server).

    Each text is padded to its own length bucket, and every batch of a bucket has the same shape,
    :func:`invariant_rows` x length, empty rows filling the last one. A text then always runs in one
    program of one shape, and a row's result does not depend on its position or on the other rows: XLA's
    CPU kernels sum each row in an order set by the shape alone (measured at the model's real widths with
    1 and 8 host devices, float32 and bfloat16; ``tests/test_batch_invariant.py`` checks it on every run).
    What the default plan's shapes cannot give: rows pick other kernels (another summation order) as the
    row count changes, and a text padded to a longer batch-mate's bucket sums its attention over more
    (masked) keys. The price is padding: a bucket's last batch is filled with empty rows.
    """
    buckets = bucket_lengths(max_len)
    order = np.argsort([-n for n in lengths], kind="stable")
    bucket_of = np.array([bucket_for(lengths[j], buckets) for j in order], dtype=np.int64)
    plan = []
    for length in sorted(set(bucket_of.tolist()), reverse=True):
        same = order[bucket_of == length]
        rows = invariant_rows(length, batch_tokens)
        plan += [BatchPlan(same[i : i + rows], length, rows) for i in range(0, len(same), rows)]
    return plan


def padded_batches(
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int,
    token_budget: int | None = None,
    *,
    invariant_tokens: int | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yields (input indices, padded batch) for texts that already carry their prompts.

    Texts are tokenized a :func:`tokenize_window` at a time and grouped by :func:`plan_batches` (with
    ``invariant_tokens``: by :func:`plan_invariant_batches`, which ignores ``batch_size`` and
    ``token_budget``); each batch holds empty padding rows after the ``len(indices)`` real ones.
    """
    window = tokenize_window(batch_size, token_budget if invariant_tokens is None else invariant_tokens)
    for start, ids in tokenized_windows(tokenizer, texts, window):
        lengths = [len(x) for x in ids]
        if invariant_tokens is None:
            plan = plan_batches(lengths, batch_size, token_budget, tokenizer.max_length)
        else:
            plan = plan_invariant_batches(lengths, invariant_tokens, tokenizer.max_length)
        for b in plan:
            rows = [ids[i] for i in b.indices]
            yield start + b.indices, tokenizer.pad(rows + [[]] * (b.rows - len(rows)), b.length)


# Packed rows: every row holds PACK_MIN_LENGTH tokens or more, so short texts share rows. Attention in a
# row is masked to each text (see masks.segment_mask): the extra masked scores cost ~4 x row length x model
# width FLOPs per token, about 9% of a layer's matmuls at 256 tokens.
PACK_MIN_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Texts packed into ``rows`` rows of ``length`` tokens, at most ``segments`` texts per row.

    ``input_ids``, ``segment_ids`` (1..k per text in a row, 0 on padding) and ``positions`` (each token's
    position in its own text) are [rows, length] int32; text i of the batch sits in row ``text_rows[i]``
    as segment ``text_segments[i]`` (1-based)."""

    input_ids: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    text_rows: np.ndarray
    text_segments: np.ndarray
    segments: int

    @property
    def slots(self) -> np.ndarray:
        """Each text's index in the flattened [rows * segments] outputs."""
        return self.text_rows * self.segments + self.text_segments - 1


def pack_rows(lengths: Sequence[int], length: int, max_rows: int, max_segments: int) -> np.ndarray:
    """Best-fit decreasing: texts (sorted longest first) into at most ``max_rows`` rows of ``length`` tokens
    and ``max_segments`` texts each; each text goes to the open row it fills most tightly, or opens a row.
    Returns each text's row, -1 for a text left for a later batch. O(texts x log rows)."""
    rows = np.full(len(lengths), -1, dtype=np.int64)
    open_rooms: list[tuple[int, int]] = []  # (room, row), sorted, of rows that can take another text
    count = [0] * max_rows
    opened = 0
    smallest = lengths[-1] if len(lengths) else 0
    for i, n in enumerate(lengths):
        k = bisect.bisect_left(open_rooms, (n, -1))
        if k < len(open_rooms):
            room, r = open_rooms.pop(k)
        elif opened < max_rows:
            room, r = length, opened
            opened += 1
        else:
            if not open_rooms or open_rooms[-1][0] < smallest:
                break  # every row is full for what is left
            continue
        rows[i] = r
        count[r] += 1
        room -= n
        if count[r] < max_segments and room >= smallest:
            bisect.insort(open_rooms, (room, r))
    return rows


def packed_batches(
    tokenizer: Any, texts: Sequence[str], batch_size: int, token_budget: int
) -> Iterator[tuple[np.ndarray, PackedBatch]]:
    """Yields (input indices, packed batch): the texts of a tokenization window, longest first, packed into
    rows of ``length`` = max(:data:`PACK_BUCKETS` bucket of the longest remaining text,
    :data:`PACK_MIN_LENGTH`) tokens, at most ``batch_size`` rows and ``rows * length <=
    min(token_budget, MAX_BATCH_TOKENS)``, at most ``length // 8`` texts per row. The last batch of a
    length has its rows padded to a power of two (a bounded number of shapes)."""
    max_len = tokenizer.max_length
    buckets = bucket_lengths(max_len, PACK_BUCKETS)
    budget = min(token_budget, MAX_BATCH_TOKENS)
    for start, ids in tokenized_windows(tokenizer, texts, tokenize_window(batch_size, token_budget)):
        remaining = np.argsort([-len(x) for x in ids], kind="stable")
        while remaining.size:
            length = max(bucket_for(len(ids[remaining[0]]), buckets), min(PACK_MIN_LENGTH, max_len))
            max_rows = max(1, min(batch_size, budget // length))
            segments = max(1, length // 8)
            rows = pack_rows([len(ids[j]) for j in remaining], length, max_rows, segments)
            taken = rows >= 0
            sel, rows = remaining[taken], rows[taken]
            remaining = remaining[~taken]
            n_rows = batch_rows(int(rows.max()) + 1, max_rows)
            yield start + sel, _fill_rows([ids[j] for j in sel], rows, n_rows, length, segments, tokenizer.pad_id)


def _fill_rows(
    ids: list[list[int]], rows: np.ndarray, n_rows: int, length: int, segments: int, pad_id: int
) -> PackedBatch:
    """Writes texts (token lists) into their rows, one after another, numbering them 1, 2, ... per row."""
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(rows, kind="stable")
    r, n = rows[order], lens[order]
    ends = np.cumsum(n)
    group_start = np.r_[0, np.flatnonzero(np.diff(r)) + 1]  # first text of each row (in this order)
    group_of = np.repeat(np.arange(len(group_start)), np.diff(np.r_[group_start, len(r)]))
    start_in_row = ends - n - (ends - n)[group_start][group_of]
    seg_sorted = np.arange(len(r)) - group_start[group_of] + 1
    within = np.arange(ends[-1]) - np.repeat(ends - n, n)  # each token's position in its text
    dest = np.repeat(r * length + start_in_row, n) + within
    tokens = np.fromiter(itertools.chain.from_iterable(ids[i] for i in order), dtype=np.int32, count=int(ends[-1]))
    input_ids = np.full(n_rows * length, pad_id, dtype=np.int32)
    segment_ids = np.zeros(n_rows * length, dtype=np.int32)
    positions = np.zeros(n_rows * length, dtype=np.int32)
    input_ids[dest] = tokens
    segment_ids[dest] = np.repeat(seg_sorted, n)
    positions[dest] = within
    text_segments = np.empty(len(ids), dtype=np.int64)
    text_segments[order] = seg_sorted
    shape = (n_rows, length)
    return PackedBatch(
        input_ids.reshape(shape), segment_ids.reshape(shape), positions.reshape(shape), rows, text_segments, segments
    )
