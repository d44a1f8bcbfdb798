"""bench/estimate_bench.py runs end to end on the CPU (a benchmark: its accuracy target is measured on GPUs)."""

import json

from bench import estimate_bench


def test_estimate_bench_sets_predicted_beside_measured(tmp_path):
    out = tmp_path / "estimate_bench.json"
    report = estimate_bench.main(["--case", "tiny:2:64", "--case", "tiny:2:64:nogc", "--work", str(tmp_path / "work"),
                                  "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == report["rows"]
    on, off = report["rows"]
    assert (on["micro_batch"], on["seq"], on["gradient_checkpointing"]) == (2, 64, True)
    assert off["gradient_checkpointing"] is False
    for row in (on, off):
        assert row["predicted_bytes"] > 0 and row["measured_bytes"] > 0
        assert row["error"] == row["predicted_bytes"] / row["measured_bytes"] - 1
    assert off["predicted_bytes"] > on["predicted_bytes"]  # activations of every layer, not one
    # The second case loaded the base the first one quantized.
    assert len(list((tmp_path / "work").glob("llama-*/estimate/quantized/config.json"))) == 1
