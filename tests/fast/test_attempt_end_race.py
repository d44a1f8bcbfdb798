"""While a worker writes how an attempt ended, its watch goes on beating (the reaper must not take the job), but
decides nothing: the end is the main thread's to write. Since the heartbeats were kept up to the end's write
(1eb29c5), the watch could also write one (a time limit, a stop before training), and the first compare-and-set
won: a run that had finished training and stored its artifacts was recorded failed."""

from __future__ import annotations

from app.db import session_scope
from app.jobs import states
from app.jobs.runs import ClaimedJob, ObjectRef
from app.jobs.tables import Job
from worker.supervisor import AttemptWatch, JobRun
from worker.training.protocol import WorkDir


def test_a_run_that_crosses_its_time_limit_while_its_success_is_written_succeeds(settings, make_job, tmp_path):
    job_id = make_job(states.RUNNING, attempt=1, worker="w1")
    job = ClaimedJob(id=job_id, team_id="team", queue="gpu-default", attempt=1, spec={}, base_model={},
                     train=ObjectRef("d", "k", "s", 0), validation=None)
    run = JobRun(settings, job_id, "w1")
    watch = AttemptWatch(settings, run.db, job, WorkDir(tmp_path / "attempt-1"))  # beats run here, one by one
    watch.ending()  # training is over and the artifacts are stored: the main thread writes the end
    watch.started -= settings.job_time_limit_s + 1  # ...as the attempt crosses QLORA_JOB_TIME_LIMIT_S
    watch._beat()  # the watch's beat meanwhile (a slow write, or one riding out an outage)
    run._finish(job, states.SUCCEEDED)
    with session_scope(settings.database_url) as session:
        ended = session.get(Job, job_id)
        assert ended is not None and (ended.status, ended.error) == (states.SUCCEEDED, None)


def test_a_claim_that_lands_as_its_worker_stops_is_handed_back_before_training(settings, make_job, tmp_path):
    """The worker's hand-back runs once, as the stop (SIGTERM, Ctrl-C) comes: one that came just after the task's look
    at the stop flag, before its claim landed, found no job to hand back, and the attempt trained on until `serve`
    killed the worker 30 s later. Now the attempt looks at the flag again once its claim has landed, and hands the
    job back at once: queued again, nothing prepared (the dataset here is not in storage) and nothing trained."""
    from app.jobs.tables import JobEvent

    job_id = make_job(states.RUNNING, attempt=1, worker="w1")
    job = ClaimedJob(id=job_id, team_id="team", queue="gpu-default", attempt=1, spec={}, base_model={},
                     train=ObjectRef("d", "k", "s", 0), validation=None)
    JobRun(settings, job_id, "w1", stopping=lambda: True)._attempt(job)
    with session_scope(settings.database_url) as session:
        ended = session.get(Job, job_id)
        assert ended is not None and (ended.status, ended.preempting, ended.lost_workers) == (states.QUEUED, False, 0)
        said = [e.message for e in session.query(JobEvent).filter_by(job_id=job_id, type="paused")]
        assert said == ["handed back before training started: worker w1 is shutting down"]
