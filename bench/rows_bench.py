"""Host memory of the encoded dataset, in bytes per token: the rows as the recipe stores them against the Python lists
that `Dataset.from_list` was given before (the baseline, in the same run).

    .venv/bin/python bench/rows_bench.py [--tokens 2000000] [--row-tokens 400] [--packing]

Synthetic chat rows (a user turn and a longer assistant turn of the tiny tokenizer's words, about --row-tokens
tokens each) until --tokens kept tokens, encoded with the tiny tokenizer the tests build. Each way runs in a process
of its own, from the same JSONL file read as the recipe reads it:

- `lists`: encode_examples' rows (Python lists of ints), then Dataset.from_list, both held, as the recipe held them,
  and the copy trl's SFTTrainer makes of a processed dataset as it prepares it (a truncation map, or packing with
  --packing), held beside the rows as the trainer holds it;
- `prepared`: rows_dataset(kept_rows(...)) (worker/training/rows.py) and trl's copy of them, as the recipe held them
  before it skipped trl's preparation of unpacked rows;
- `arrow`: the recipe's way now: the rows, and trl's copy only with --packing (unpacked, the trainer is given the
  rows as they are: skip_prepare_dataset, recipe._trainer_args). Per way: `held_bytes_per_token` (RSS after
all of it, less RSS before encoding, over the kept tokens), `peak_bytes_per_token` (peak RSS less RSS before
encoding), `arrow_bytes_per_token` (Arrow's own allocations), and `examples_bytes_per_token` (the rows as read,
which the run holds too). Each is the slope between a run at half --tokens and one at all of them: what a token
adds, without the fixed costs (a batch's transient lists). estimate.DATASET_BYTES_PER_TOKEN counts the arrow
way's held bytes and the examples', rounded up. Exit 1 if the ways' datasets differ in a row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: worker/ imports from this checkout

DEFAULT_OUT = ROOT / "bench" / "results" / "rows_bench.json"
MAX_SEQ_LENGTH = 2048
WORDS = ("the a an is are was of to and in on at for with from by this that it as be you we they hello thanks please "
         "answer question model data train learn small test sound make say ask know zero one two three four five six "
         "seven eight nine ten yes no maybe good bad fast slow").split()


def write_rows(path: Path, rows: int, row_tokens: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            words = max(4, row_tokens - 20)  # a word (with its space) is about a token; the template adds ~20
            prompt = " ".join(rng.choice(WORDS) for _ in range(words // 4))
            answer = " ".join(rng.choice(WORDS) for _ in range(words - words // 4))
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(way: str, data: str, tokenizer_dir: str, packing: bool) -> dict:
    """One way, in this process: what it holds once the rows and the trainer's copy are built."""
    import gc

    import pyarrow as pa
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from worker.training.data import read_jsonl
    from worker.training.rows import rows_dataset
    from worker.training.tokenization import EncodeStats, encode_examples, kept_rows, prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prepare_tokenizer(tokenizer)
    gc.collect()
    _trim()
    unread = rss()
    examples = read_jsonl(data).examples  # held for the whole run too (the report's prompts)
    gc.collect()
    _trim()
    read = rss()
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=MAX_SEQ_LENGTH, packing=packing,
                     packing_strategy="bfd", report_to=[], bf16=False, use_cpu=True)
    # What SFTTrainer.__init__ does with a processed train dataset (it needs nothing else of the trainer); once on
    # a row first, so that what it imports and caches on first use is not counted.
    def prepare(dataset):
        return SFTTrainer._prepare_dataset(object(), dataset, tokenizer, args, packing, None, "train")

    prepare(rows_dataset([{"input_ids": [1, 2], "labels": [1, 2]}], ("input_ids", "labels")))
    gc.collect()
    _trim()
    before, arrow_before = rss(), pa.total_allocated_bytes()
    if way == "lists":
        rows, stats = encode_examples(examples, tokenizer, max_seq_length=MAX_SEQ_LENGTH, train_on_inputs=False)
        dataset = Dataset.from_list(rows)
    else:
        stats = EncodeStats()
        rows = rows_dataset(kept_rows(examples, tokenizer, stats, max_seq_length=MAX_SEQ_LENGTH, train_on_inputs=False),
                            ("input_ids", "labels"))
        dataset = rows
    prepared = dataset if way == "arrow" and not packing else prepare(dataset)
    gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _trim()  # what malloc keeps of freed memory (a batch's transient lists) is reused, not held per token
    held = rss()
    arrow = pa.total_allocated_bytes() - arrow_before
    tokens = stats.tokens
    digest = _digest(prepared)
    del rows, dataset, prepared
    return {"way": way, "tokens": tokens, "rows": stats.rows,
            "held_bytes_per_token": (held - before) / tokens, "peak_bytes_per_token": (peak - before) / tokens,
            "arrow_bytes_per_token": arrow / tokens, "examples_bytes_per_token": (read - unread) / tokens,
            "dataset_sha256": digest}


def _trim() -> None:
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then counts freed memory too
        pass


def _digest(dataset) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(dataset.column_names):
        for start in range(0, len(dataset), 10_000):
            h.update(json.dumps(dataset[start:start + 10_000][name]).encode())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--row-tokens", type=int, default=400)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--measure", nargs=3, metavar=("WAY", "DATA", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the child process
        print(json.dumps(measure(*args.measure, packing=args.packing)))
        return 0
    from worker.training.tiny import build_tokenizer

    results: dict[str, list[dict]] = {"lists": [], "prepared": [], "arrow": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        build_tokenizer().save_pretrained(tokenizer_dir)
        for share in (2, 1):  # half the tokens, then all: the slope between them is what each token adds
            data = Path(tmp) / f"train-{share}.jsonl"
            write_rows(data, max(2, args.tokens // args.row_tokens // share), args.row_tokens)
            for way in results:
                child = subprocess.run(
                    [sys.executable, __file__, "--measure", way, str(data), str(tokenizer_dir),
                     *(["--packing"] if args.packing else [])],
                    capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                results[way].append(json.loads(child.stdout.strip().splitlines()[-1]))
    report: dict = {"packing": args.packing, "row_tokens": args.row_tokens}
    print(f"{'way':<8}{'tokens':>10}{'held B/token':>14}{'peak B/token':>14}{'arrow B/token':>15}"
          f"{'examples B/token':>18}")
    for way, (half, whole) in results.items():
        added = whole["tokens"] - half["tokens"]
        slope = {key: (whole[f"{key}_bytes_per_token"] * whole["tokens"] - half[f"{key}_bytes_per_token"]
                       * half["tokens"]) / added for key in ("held", "peak", "arrow", "examples")}
        report[way] = {"runs": [half, whole], **{f"{key}_bytes_per_token": value for key, value in slope.items()}}
        print(f"{way:<8}{whole['tokens']:>10}{slope['held']:>14.1f}{slope['peak']:>14.1f}{slope['arrow']:>15.1f}"
              f"{slope['examples']:>18.1f}")
    same = all(len({run["dataset_sha256"] for run in runs}) == 1 for runs in zip(*results.values(), strict=True))
    report["same_dataset"] = same
    report["held_ratio"] = report["arrow"]["held_bytes_per_token"] / report["lists"]["held_bytes_per_token"]
    report["unprepared_ratio"] = report["arrow"]["held_bytes_per_token"] / report["prepared"]["held_bytes_per_token"]
    print(f"per token added (between {results['arrow'][0]['tokens']} and {results['arrow'][1]['tokens']} tokens); "
          f"held, arrow / lists: {report['held_ratio']:.2f}, arrow / prepared: {report['unprepared_ratio']:.2f}; "
          f"same dataset: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
