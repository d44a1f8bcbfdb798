"""What pollers get on Postgres: every polled read (a job, a page of jobs, a curve) carries an ETag, an
unchanged poll that sends it back gets 304 with no body, and a change gets the new answer. The lean
reads answer exactly what the job's other routes answer."""

from __future__ import annotations

from datetime import datetime

from app.db import session_scope
from app.jobs import repository, runs, states
from tests.deployment import lane, upload
from worker.training.protocol import Progress
from worker.training.tiny import demo_spec


def test_unchanged_polls_answer_304_and_a_change_answers_anew(deployment, team_a, team_b, demo_data):
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    spec = demo_spec("tiny")
    created = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"), **spec}).json()
    job_url = f"/jobs/{created['id']}"
    openai_url = f"/v1/fine_tuning/jobs/ftjob-{created['id']}"  # what the openai SDK's retrieve() polls

    for url in (job_url, "/jobs?limit=5", f"{job_url}/metrics", f"{job_url}/events", openai_url):
        first = team_a.get(url)
        etag = first.headers["etag"]
        assert first.status_code == 200 and etag.startswith('"') and "no-cache" in first.headers["cache-control"]
        again = team_a.get(url, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag, url
        assert team_a.get(url, headers={"If-None-Match": f'"other", W/{etag}'}).status_code == 304
        assert team_a.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    # Another team's job is 404 whatever it sends: a 304 would tell it the job exists.
    for url in (job_url, openai_url):
        for sent in ('"anything"', "*", team_a.get(url).headers["etag"]):
            assert team_b.get(url, headers={"If-None-Match": sent}).status_code == 404

    before = {url: team_a.get(url).headers["etag"]
              for url in (job_url, "/jobs?limit=5", f"{job_url}/metrics", f"{job_url}/events", openai_url)}
    with session_scope(deployment.settings.database_url) as session:  # as a worker logs a point
        repository.upsert_metric(session, created["id"], {"kind": "train", "step": 1, "train_loss": 2.5})
    curve = team_a.get(f"{job_url}/metrics", headers={"If-None-Match": before[f"{job_url}/metrics"]})
    assert curve.status_code == 200 and [p["step"] for p in curve.json()["train"]] == [1]

    cancelled = team_a.post(f"{job_url}/cancel").json()
    for url in (job_url, "/jobs?limit=5", f"{job_url}/events", openai_url):  # the cancel is an event too
        changed = team_a.get(url, headers={"If-None-Match": before[url]})
        assert changed.status_code == 200 and changed.headers["etag"] != before[url]
    # The lean read answers what the ORM's JobOut answers for the same job; the list, all of it but the heartbeat.
    assert team_a.get(job_url).json() == cancelled
    listed = next(j for j in team_a.get("/jobs?limit=50").json()["data"] if j["id"] == created["id"])
    assert listed == {name: value for name, value in cancelled.items() if name != "heartbeat_at"}
    assert team_a.get(openai_url).json()["status"] == "cancelled"


def test_a_poll_of_the_list_across_heartbeats_is_a_304_and_a_step_or_a_status_is_news(deployment, demo_data):
    """A running job's worker writes its heartbeat every supervise interval, whatever else happens. Polls of the
    list across heartbeats, nothing else changed, get the same ETag and a 304 (the dashboard polls the list
    every 3 s: it got the whole page each time while any job ran); GET /jobs/{id} still shows each heartbeat;
    a step, and a change of status, are answered anew."""
    with deployment.client(deployment.team_key("polling-heartbeats")) as client:
        dataset_id = upload(client, demo_data["validation"]).json()["id"]
        job_id = client.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"),
                                            **demo_spec("tiny")}).json()["id"]
        database_url = deployment.settings.database_url
        with session_scope(database_url) as session:  # as the worker of its class claims it
            claimed = runs.claim(session, job_id, "hand:gpu0")
            assert claimed is not None
        listing, job_url = "/jobs?limit=100", f"/jobs/{job_id}"
        first, job_first = client.get(listing), client.get(job_url)
        [listed] = first.json()["data"]
        assert listed["status"] == states.RUNNING and "heartbeat_at" not in listed

        def beat() -> None:
            with session_scope(database_url) as session:  # the worker's next heartbeat, and nothing else
                assert runs.heartbeat(session, job_id, claimed.attempt) == states.RUNNING

        heard = [datetime.fromisoformat(job_first.json()["heartbeat_at"])]
        for _ in range(2):
            beat()
            again = client.get(listing, headers={"If-None-Match": first.headers["etag"]})
            assert again.status_code == 304 and again.headers["etag"] == first.headers["etag"]
            job = client.get(job_url, headers={"If-None-Match": job_first.headers["etag"]})
            assert job.status_code == 200, "GET /jobs/{id} shows each heartbeat"
            heard.append(datetime.fromisoformat(job.json()["heartbeat_at"]))
        assert heard == sorted(set(heard))

        with session_scope(database_url) as session:  # a step trained: the worker's report, with its heartbeat
            runs.report(session, job_id, claimed.attempt, [], Progress(step=1, total_steps=10, tokens_seen=64))
        stepped = client.get(listing, headers={"If-None-Match": first.headers["etag"]})
        assert stepped.status_code == 200 and stepped.headers["etag"] != first.headers["etag"]
        assert stepped.json()["data"][0]["step"] == 1

        beat()
        assert client.get(listing, headers={"If-None-Match": stepped.headers["etag"]}).status_code == 304
        assert client.post(f"{job_url}/cancel").status_code == 200
        cancelling = client.get(listing, headers={"If-None-Match": stepped.headers["etag"]})
        assert cancelling.status_code == 200 and cancelling.json()["data"][0]["status"] == states.CANCELLING


def test_the_cli_client_polls_with_the_etag_it_has(deployment, demo_data):
    from app.cli.api_client import ApiClient

    key = deployment.team_key("polling-cli")
    with ApiClient(deployment.url, key) as api:
        statuses: list[int] = []
        api._http.event_hooks["response"].append(lambda response: statuses.append(response.status_code))
        dataset_id = api.upload_dataset(demo_data["validation"])["id"]
        job = api.create_job({"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"), **demo_spec("tiny")})
        statuses.clear()
        first, again = api.get_job(job["id"]), api.get_job(job["id"])
        curve, curve_again = api.job_metrics(job["id"], after_step=0), api.job_metrics(job["id"], after_step=0)
        events, events_again = api.job_events(job["id"]), api.job_events(job["id"])
        assert statuses == [200, 304, 200, 304, 200, 304] and events_again == events
        assert again == first and again is not first and curve_again == curve
        api.job_request(job["id"], "cancel")
        assert api.get_job(job["id"])["status"] == "cancelled" and statuses[-1] == 200


def test_qlora_jobs_watch_holds_every_evaluation_though_each_lands_after_its_steps_train_point(deployment, demo_data):
    """An evaluation at step N is recorded after step N's train point. `qlora jobs watch` reads the
    curve past what it holds of each series: an evaluation that landed after the watcher already held
    its step's train point (each one here, and at the end the final one, as the job succeeds) is still
    read, and the eval loss it shows is the last one."""
    from sqlalchemy import update

    from app.cli.api_client import ApiClient
    from app.cli.client import _JobWatcher
    from app.jobs.tables import Job

    with ApiClient(deployment.url, deployment.team_key("polling-watch")) as api:
        dataset_id = api.upload_dataset(demo_data["validation"])["id"]
        job_id = api.create_job({"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"), **demo_spec("tiny")})["id"]
        watcher = _JobWatcher(api, job_id)

        def worker_logs(points: list[tuple[str, int]], step: int, status: str = "running") -> None:
            with session_scope(deployment.settings.database_url) as session:  # as the worker records them
                for kind, at in points:
                    loss = {"train_loss": 1.0 / at} if kind == "train" else {"eval_loss": 2.0 / at}
                    repository.upsert_metric(session, job_id, {"kind": kind, "step": at, **loss})
                session.execute(update(Job).where(Job.id == job_id).values(step=step, status=status))

        worker_logs([("train", 5), ("train", 10)], step=10)
        watcher.poll()
        assert watcher.eval_loss is None and watcher.train_losses == [1 / 5, 1 / 10]
        worker_logs([("eval", 10), ("train", 15), ("train", 20)], step=20)  # step 10's evaluation, then on
        watcher.poll()
        assert watcher.eval_loss == 2.0 / 10
        worker_logs([("eval", 20)], step=20, status="succeeded")  # the last evaluation, then the end
        watcher.poll()
        assert watcher.ended and watcher.eval_loss == 2.0 / 20
        assert watcher.last_step == {"train": 20, "eval": 20} and watcher.train_losses == [1 / 5, 1 / 10, 1 / 15, 1 / 20]
