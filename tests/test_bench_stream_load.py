"""The stream load benchmark runs end to end at a small size and reports what it measured.

Behaviour only: every client saw every point and event once and in order, and the database's work
was read for each phase. How much N streams cost against one is the benchmark's own figure (its exit
status holds it to the target); over windows this short Postgres' counts are too coarse to assert it.
"""

import json

from bench import stream_load
from tests.services import in_a_thread_of_its_own


def test_stream_load_benchmark_checks_every_client_and_reads_the_databases_work(tmp_path):
    out = tmp_path / "stream_load.json"

    # Its clients run on an event loop of their own, in a thread of their own (see in_a_thread_of_its_own).
    # Windows of 2 s, each opened 2 s after the phase before it rather than the bench's 11 (most of the run's time,
    # asleep): a count that lands late moves between windows, and each window still holds the API's own
    # transactions (a dozen in 3 s with no stream open, measured here), so the checks below keep their margin.
    exit_code = in_a_thread_of_its_own(lambda: stream_load.main(["--clients", "20", "--seconds", "2", "--settle-s", "2",
                                                                 "--out", str(out)]))

    results = json.loads(out.read_text())
    assert {"config", "machine", "no_stream", "one", "many", "checks", "ratio_many_to_one", "ok"} <= results.keys()
    assert exit_code == (0 if results["ok"] else 1)
    assert results["config"]["clients"] == 20
    assert results["config"]["keys"] == 2  # 20 streams over keys that may each hold QLORA_MAX_STREAMS_PER_KEY (10)
    for name, check in results["checks"].items():
        assert check["ok"], f"{name}: {check['problems']}"
    assert results["streams_left_open"] == 0
    assert results["final_step"] > 0 and results["events"] > 0

    for phase in ("one", "many"):
        measured = results[phase]
        assert measured["caught_up_to_step"] > 0
        assert measured["connect"]["api_transactions"] > 0  # opening streams costs the API's requests at least
        steady = measured["steady"]
        assert steady["seconds"] >= 2 and steady["worker_transactions"] > 0
        assert steady["api_transactions_per_s"] > 0  # a watched job is polled: Postgres counted it
    assert results["many"]["clients"] == 20 and results["one"]["clients"] == 1
    assert isinstance(results["ratio_many_to_one"], float) and results["ratio_many_to_one"] > 0
