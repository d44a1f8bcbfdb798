"""GET /ready names the broker and object storage beside the database. It said {"status": "ok"} while Redis or the
store was down: uploads answered 503 and new jobs waited unsent, and an operator's monitoring of the readiness
probe saw nothing. The database alone makes it a 503 (app/operations/readiness.py says why)."""

from __future__ import annotations

import time

from tests import services
from tests.deployment import BUCKET, start_deployment, stop_deployment

DEADLINE_S = 60  # for the answer to change after an outage begins or ends (it is up to a second old)


def _ready_when(api, check) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        answer = api.get("/ready")
        if check(answer.json()):
            assert answer.status_code == 200, answer.text  # the database answers: never drained for these
            return answer.json()
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)


def test_ready_names_a_broker_or_storage_that_is_down_without_draining_the_api(tmp_path, tiny_model_dir):
    services.ensure_postgres()
    redis = services.RedisServer(tmp_path)  # a broker and a store of this test's own, which it stops
    redis.start()
    endpoint, stop_s3 = services.start_s3_server()
    s3_up = True
    deployment = None
    try:
        services.create_bucket(endpoint, BUCKET)
        (tmp_path / "home").mkdir()
        deployment = start_deployment(tmp_path / "home", endpoint, tiny_model_dir, broker_url=redis.url)
        api = deployment.client(None)
        everything_ok = {"status": "ok", "database": "ok", "broker": "ok", "storage": "ok"}
        assert _ready_when(api, lambda body: body["status"] == "ok") == everything_ok

        redis.stop()
        down = _ready_when(api, lambda body: body["broker"] != "ok")
        assert down["status"] == "degraded" and down["database"] == down["storage"] == "ok", down
        assert down["broker"].startswith("unreachable: the broker (QLORA_BROKER_URL) failed: "), down
        assert redis.url not in down["broker"]  # what the setting holds (a password, say) is not said
        redis.start()  # on the same port
        assert _ready_when(api, lambda body: body["status"] == "ok") == everything_ok

        stop_s3()
        s3_up = False
        down = _ready_when(api, lambda body: body["storage"] != "ok")
        assert down["status"] == "degraded" and down["database"] == down["broker"] == "ok", down
        assert down["storage"].startswith("unreachable: the storage"), down
        assert api.get("/health").status_code == 200
    finally:
        if deployment is not None:
            stop_deployment(deployment)
        redis.stop()
        if s3_up:
            stop_s3()
