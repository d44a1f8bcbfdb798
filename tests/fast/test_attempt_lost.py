"""Which failures of the worker give a job another attempt (storage or the database out of reach for a
moment: worker/supervisor.py, _out_of_reach) and which fail it (anything else: a fault of the job, or a
bug, which another attempt would only repeat)."""

from __future__ import annotations

import botocore.exceptions
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from worker.supervisor import _out_of_reach


def client_error(status: int, code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                                           "PutObject")


@pytest.mark.parametrize("exc, another_attempt", [
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3:9000"), True),  # S3 down
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3:9000"), True),
    (botocore.exceptions.ConnectionClosedError(endpoint_url="http://s3:9000"), True),
    (client_error(503, "SlowDown"), True),
    (client_error(500, "InternalError"), True),
    (client_error(400, "SlowDown"), True),
    (client_error(403, "AccessDenied"), False),  # a wrong key stays wrong
    (client_error(404, "NoSuchKey"), False),
    (OperationalError("UPDATE jobs", {}, Exception("terminating connection due to administrator command")), True),
    (IntegrityError("INSERT", {}, Exception("duplicate key")), False),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (ValueError("a bug"), False),
    (KeyError("spec"), False),
])
def test_only_storage_or_the_database_out_of_reach_is_worth_another_attempt(exc, another_attempt):
    assert _out_of_reach(exc) is another_attempt
