"""The encoded rows as the trainer's dataset, stored compactly while they are encoded.

Held as Python lists of ints, a token's id and label took ~49 bytes of host memory, and `Dataset.from_list` copied
them again (~76 bytes a token in all, for the whole run: 3.8 GB at 50M tokens). Here each batch of rows becomes
Arrow int32 columns as soon as it is encoded, so only one batch is ever held as Python lists: 4 bytes per token
and column, plus a row's offsets. The rows, their order and their values are the same (tests/training/
test_rows.py); the trainer reads them back as Python ints, as it read from_list's int64 columns.
`bench/rows_bench.py` measures the bytes per token; estimate.DATASET_BYTES_PER_TOKEN counts what is left.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import pyarrow as pa
from datasets import Dataset

BATCH_ROWS = 1_000  # rows held as Python lists at once, before they become Arrow columns
TOKEN_IDS = pa.list_(pa.int32())  # ids below 2**31 (vocabularies are ~10**5), labels -100 or an id


def rows_dataset(rows: Iterable[dict], columns: tuple[str, ...]) -> Dataset:
    """`rows` (each a dict of `columns`, lists of token ids) as an in-memory Dataset, in order, built a batch at a
    time from the iterable (kept_rows / kept_pairs encode as it is read)."""
    schema = pa.schema([(name, TOKEN_IDS) for name in columns])
    rows = iter(rows)
    batches = []
    while batch := list(islice(rows, BATCH_ROWS)):
        batches.append(pa.record_batch([pa.array([row[name] for row in batch], type=TOKEN_IDS) for name in columns],
                                       schema=schema))
    return Dataset(pa.Table.from_batches(batches, schema=schema))
