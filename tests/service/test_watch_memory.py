"""`qlora jobs watch` holds what it prints of a curve, whatever its length: it kept every point it had read,
twice (a dict, and a string to tell new points from seen ones), and its client the last 16 pages of 10,000
points parsed for If-None-Match: hundreds of MB for a run of 500,000 steps, growing as it ran."""

from __future__ import annotations

import gc
import tracemalloc

from sqlalchemy import insert, update

from app.db import session_scope
from app.jobs import repository
from app.jobs.tables import Job, JobMetric
from tests.deployment import lane
from worker.training.tiny import demo_spec

STEPS = 60_000
EVAL_EVERY = 100
HELD_MOST = 8 * 2**20  # what the watcher may hold after a poll; every point of this curve was ~80 MB


def held_after(poll) -> int:
    """The bytes still allocated once `poll()` has returned (what it read and let go of is freed)."""
    gc.collect()
    tracemalloc.start()
    try:
        poll()
        gc.collect()
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_jobs_watch_holds_a_bounded_summary_of_a_long_curve_and_passes_each_point_on_once(deployment, demo_data):
    from app.cli.api_client import ApiClient
    from app.cli.client import _JobWatcher

    url = deployment.settings.database_url
    with ApiClient(deployment.url, deployment.team_key("watch-memory")) as api:
        dataset_id = api.upload_dataset(demo_data["validation"])["id"]
        job_id = api.create_job({"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"), **demo_spec("tiny")})["id"]
        with session_scope(url) as session:  # a long run's curve, as the worker's upserts leave it
            session.execute(insert(JobMetric), [{"job_id": job_id, "kind": "train", "step": s, "train_loss": 3.0 - s / 30_000,
                                                 "tokens_per_second": 3000.0} for s in range(1, STEPS + 1)])
            session.execute(insert(JobMetric), [{"job_id": job_id, "kind": "eval", "step": s, "eval_loss": 3.5 - s / 30_000}
                                                for s in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)])
            session.execute(update(Job).where(Job.id == job_id).values(status="running", step=STEPS, attempt=1))

        # A terminal's view: the thinned curve, then the points logged since; only what it prints is held.
        shown = _JobWatcher(api, job_id)
        assert held_after(shown.poll) < HELD_MOST
        assert shown.train_loss == 3.0 - STEPS / 30_000 and shown.eval_loss == 3.5 - STEPS / 30_000
        assert shown.last_step == {"train": STEPS, "eval": STEPS} and 100 < len(shown.train_losses) <= 1000
        assert shown.train_losses[0] > shown.train_losses[len(shown.train_losses) // 2] > shown.train_losses[-1]
        with session_scope(url) as session:
            for s in range(STEPS + 1, STEPS + 11):
                repository.upsert_metric(session, job_id, {"kind": "train", "step": s, "train_loss": 0.5})
            session.execute(update(Job).where(Job.id == job_id).values(step=STEPS + 10))
        shown.poll()
        assert shown.train_loss == 0.5 and shown.last_step["train"] == STEPS + 10

        # A pipe: every point once, passed on as read, none kept once taken.
        piped = _JobWatcher(api, job_id, every_point=True)
        taken: list[tuple[str, int]] = []

        def poll_and_take() -> None:
            piped.poll()
            taken.extend((split, point["step"]) for split, point in piped.take_new_points())

        assert held_after(poll_and_take) < HELD_MOST + len(taken) * 200  # the (split, step) pairs this test keeps
        assert len(set(taken)) == len(taken)
        assert sorted(s for split, s in taken if split == "train") == list(range(1, STEPS + 11))
        assert sorted(s for split, s in taken if split == "eval") == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))

        # A second attempt resumes from the checkpoint at step 59,000 and logs the steps past it again: those
        # are passed on again, the ones before it are not.
        resumed_from = STEPS - 1_000
        with session_scope(url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(attempt=2, step=resumed_from + 500))
            repository.delete_metrics_after(session, job_id, resumed_from)
            repository.add_event(session, job_id, "resumed", "warning", f"attempt 2 resumes from the checkpoint at step "
                                 f"{resumed_from}", attempt=2, step=resumed_from)
            for s in range(resumed_from + 1, resumed_from + 501):
                repository.upsert_metric(session, job_id, {"kind": "train", "step": s, "train_loss": 1.0})
                if s % EVAL_EVERY == 0:
                    repository.upsert_metric(session, job_id, {"kind": "eval", "step": s, "eval_loss": 1.5})
        piped.poll()
        again = [(split, point["step"]) for split, point in piped.take_new_points()]
        assert [s for split, s in again if split == "train"] == list(range(resumed_from + 1, resumed_from + 501))
        assert [s for split, s in again if split == "eval"] == list(range(resumed_from + EVAL_EVERY, resumed_from + 501, EVAL_EVERY))
        shown.poll()  # the terminal's view reads the new attempt's curve again, thinned
        assert shown.train_loss == 1.0 and shown.eval_loss == 1.5 and shown.last_step == {
            "train": resumed_from + 500, "eval": resumed_from + 500}
