"""A worker host given another broker than the API's (another QLORA_BROKER_URL, or none: its own local queue) beats
as alive and idle for its queue, and the jobs the API sends wait for ever: `"waiting_for": "gpu"`, `qlora admin
status` a worker alive and a job queued, nothing anywhere saying why. The scheduler, sending such a job's message
again, now says in the API's log that a worker of the queue sat idle all along and names the setting to compare."""

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
