"""A worker host whose settings are not the API's, as an operator's deployment past one machine gets them wrong.

- Another broker (another QLORA_BROKER_URL, or none: its own local queue): it beats as alive and idle for its queue,
  and the jobs the API sends wait for ever, `"waiting_for": "gpu"`, `qlora admin status` a worker alive and a job
  queued, nothing saying why. The scheduler, sending such a job's message again, now says in the API's log that a
  worker of the queue sat idle all along and names the setting to compare.
- A storage that refuses it (another bucket, a rotated key): see the second test. (Another storage at its start is
  refused by `qlora worker` itself: tests/service/test_scale_out_start.py.)"""

from __future__ import annotations

import time

from tests import services
from tests.deployment import BUCKET, start_deployment, stop_deployment, upload
from worker.training.tiny import demo_spec

DEADLINE_S = 90  # a message is sent again once it is 10 s old (SEND_UNSENT_AFTER_S) and the redispatch time past


def test_a_worker_on_another_broker_is_named_by_the_scheduler(tmp_path, tiny_model_dir, demo_data):
    services.ensure_postgres()
    services.ensure_redis()
    other_broker = services.RedisServer(tmp_path)  # the worker host's: no API sends there
    other_broker.start()
    endpoint, stop_s3 = services.start_s3_server()
    deployment = None
    try:
        services.create_bucket(endpoint, BUCKET)
        (tmp_path / "home").mkdir()
        deployment = start_deployment(tmp_path / "home", endpoint, tiny_model_dir, redispatch_after_s=2,
                                      scheduler_interval_s=1)
        worker = deployment.start_worker(name="elsewhere", extra_env={"QLORA_BROKER_URL": other_broker.url})
        team = deployment.client(deployment.team_key("team-other-broker"))
        dataset = upload(team, demo_data["train"]).json()
        spec = demo_spec("tiny")
        spec["training"].update(max_steps=2)
        job = team.post("/jobs", json={"dataset_id": dataset["id"], **spec}).json()
        said = (f"queue {deployment.settings.queue_for()}: no worker took the message of 1 job, sent 2 s ago or more, "
                "though 1 worker of this queue (elsewhere) sat idle all that time; sent again")
        deadline = time.monotonic() + DEADLINE_S
        while said not in deployment.log("api"):
            assert worker.poll() is None and time.monotonic() < deadline, deployment.log("api")[-3000:]
            time.sleep(0.5)
        assert "compare their QLORA_BROKER_URL with the API's" in deployment.log("api")
        assert team.get(f"/jobs/{job['id']}").json()["status"] == "queued"
    finally:
        if deployment is not None:
            stop_deployment(deployment)
        other_broker.stop()
        stop_s3()


def test_a_worker_whose_storage_refuses_it_loses_the_attempt_instead_of_failing_the_job(tmp_path, tiny_model_dir,
                                                                                       demo_data):
    """A worker host whose bucket is not the API's (gone since it started, or a key rotated on the API's hosts and
    not on this one): every job it took failed, `the worker failed: NoSuchBucket: ...`, the user's job blamed for the
    host. Now the attempt is lost naming the worker and its settings, and past QLORA_MAX_ATTEMPTS the job is paused,
    to resume once the worker is mended, as after an outage."""
    import boto3

    from tests.deployment import wait_for_status

    services.ensure_postgres()
    services.ensure_redis()
    endpoint, stop_s3 = services.start_s3_server()
    deployment = None
    try:
        services.create_bucket(endpoint, BUCKET)
        services.create_bucket(endpoint, "elsewhere")
        (tmp_path / "home").mkdir()
        deployment = start_deployment(tmp_path / "home", endpoint, tiny_model_dir, max_attempts=1, out_of_reach_wait_s=0)
        # No dataset yet, so its start's check finds a bucket that answers and lets it start.
        worker = deployment.start_worker(name="elsewhere", extra_env={"QLORA_STORAGE_URL": "s3://elsewhere/prod"})
        deadline = time.monotonic() + DEADLINE_S
        while " ready." not in deployment.log("worker-elsewhere"):
            assert worker.poll() is None and time.monotonic() < deadline, deployment.log("worker-elsewhere")
            time.sleep(0.2)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=services.S3_TEST_ENV["AWS_DEFAULT_REGION"],
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.delete_bucket(Bucket="elsewhere")  # the worker's bucket is not the API's any more
        team = deployment.client(deployment.team_key("team-refused"))
        dataset = upload(team, demo_data["train"]).json()
        spec = demo_spec("tiny")
        spec["training"].update(max_steps=2)
        job = team.post("/jobs", json={"dataset_id": dataset["id"], **spec}).json()
        done = wait_for_status(team, job["id"], ("paused", "failed", "succeeded"), timeout=180, deployment=deployment)
        assert done["status"] == "paused", done
        events = team.get(f"/jobs/{job['id']}/events").json()
        said = [e["message"] for e in events if "storage refused worker elsewhere (NoSuchBucket)" in e["message"]]
        assert said and "QLORA_STORAGE_URL" in said[0], events
    finally:
        if deployment is not None:
            stop_deployment(deployment)
        stop_s3()
