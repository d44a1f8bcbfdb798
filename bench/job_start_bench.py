"""A job's start in the service: from the worker's claim to the job's first optimizer step, on the tiny model.

    .venv/bin/python bench/job_start_bench.py --baseline /path/to/another/checkout --jobs 3

One deployment (Postgres, Redis, an S3 server, the API) as the tests start it, and two workers on two GPU
classes: "this" spawns this checkout's training process; "baseline" spawns the training process of the
checkout --baseline names (PYTHONPATH: `python -m worker.runner` runs in the job's work directory, so it
finds that checkout's code first; the worker itself is this checkout's). The same short job goes to each
in turn, one at a time, `--jobs` times. Prints the median of claim -> first step (the attempt's
claimed_at to its first training point's arrival, within the worker's supervise interval of 0.5 s)
for each, and this/baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from sqlalchemy import select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db import session_scope  # noqa: E402
from app.jobs.tables import JobAttempt, JobMetric  # noqa: E402
from tests import services  # noqa: E402
from tests.deployment import BUCKET, lane, start_deployment, stop_deployment, upload, wait_for_status  # noqa: E402
from worker.training.tiny import build_tiny_model, demo_rows, demo_spec, write_jsonl  # noqa: E402


def claim_to_first_step(database_url: str, job_id: str) -> float:
    with session_scope(database_url) as session:
        claimed = session.scalar(select(JobAttempt.claimed_at).where(JobAttempt.job_id == job_id, JobAttempt.attempt == 1))
        first = session.scalar(select(JobMetric.created_at).where(JobMetric.job_id == job_id, JobMetric.kind == "train")
                               .order_by(JobMetric.step).limit(1))
    return (first - claimed).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout of this repository")
    parser.add_argument("--jobs", type=int, default=3)
    args = parser.parse_args()
    services.ensure_postgres()
    services.ensure_redis()
    endpoint, stop_s3 = services.start_s3_server()
    services.create_bucket(endpoint, BUCKET)
    with tempfile.TemporaryDirectory(prefix="job-start-bench-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny", seed=0)
        data = write_jsonl(demo_rows(0, 480, distinct=True), work / "train.jsonl")
        home = work / "home"
        home.mkdir()
        d = start_deployment(home, endpoint, model, supervise_interval_s="0.5")
        try:
            classes = {"this": lane("claims"), "baseline": lane("metrics-queue")}
            d.start_worker(gpu_class=classes["this"], name="this")
            d.start_worker(gpu_class=classes["baseline"], name="baseline",
                           extra_env={"PYTHONPATH": str(args.baseline.resolve())})
            client = d.client(d.team_key("bench"))
            dataset = upload(client, data).json()["id"]
            spec = demo_spec("tiny")
            spec["training"].update(max_steps=4, save_steps=100, logging_steps=1, eval_steps=100_000, per_device_batch_size=8)
            spec["output"] = {"merge": False}
            spec["eval"] = {"prompts": 0}
            seconds: dict[str, list[float]] = {"this": [], "baseline": []}
            for _ in range(args.jobs):
                for who in ("baseline", "this"):
                    job = client.post("/jobs", json={"dataset_id": dataset, "gpu_class": classes[who], **spec}).json()
                    done = wait_for_status(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=300, deployment=d)
                    assert done["status"] == "succeeded", done["error"]
                    seconds[who].append(claim_to_first_step(d.settings.database_url, job["id"]))
        finally:
            stop_deployment(d)
            stop_s3()
    for who, values in seconds.items():
        print(f"{who:<9} claim -> first step: median {statistics.median(values):.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"this/baseline: {statistics.median(seconds['this']) / statistics.median(seconds['baseline']):.2f}")


if __name__ == "__main__":
    main()
