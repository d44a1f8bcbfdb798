"""bench/train_bench.py runs end to end on the CPU with the tiny preset (a benchmark: no timing asserted)."""

import json
import tempfile

from bench import train_bench


def test_train_bench_compares_both_paths_on_the_cpu(tmp_path, monkeypatch):
    out = tmp_path / "train_bench.json"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))  # where the bench's own folders go
    # Few steps that leave a steady rate after the warm-up (three steps, two intervals), on small batches: each path's
    # process spends most of its time importing, and the steps it trains are what the test can make shorter.
    steps = train_bench.WARMUP_STEPS + 3
    report = train_bench.main(["--preset", "tiny", "--steps", str(steps), "--batch", "2", "--seq", "64",
                               "--packing", "on", "--out", str(out)])
    assert json.loads(out.read_text())["preset"] == "tiny"
    for path in ("baseline", "engine", "engine-cached"):
        r = report[path]
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
        assert r["peak_allocated_bytes"] > 0 and r["time_to_first_step_s"] > 0
        assert len(r["loss_curve"]) == steps
    assert report["engine"]["speedups"]["packing"] is True
    assert report["engine"]["quantized_base"] == "quantized" and report["engine-cached"]["quantized_base"] == "cache"
    assert report["cache"]["same_loss_curve"]
    assert report["baseline"]["speedups"]["packing"] is False
    assert set(report["ratio"]) == {"tokens_per_s", "mfu", "peak_allocated_bytes", "peak_reserved_bytes",
                                    "time_to_first_step_s", "final_loss"}
    # Same data, seed and rank: the loss curves agree (the tolerance is the benchmark's own).
    assert report["loss_parity"]["within"], report["loss_parity"]
    assert [p.name for p in temporary.glob("qlora-*")] == []  # without --work, its model and runs go with it (19 MB a run were left)
