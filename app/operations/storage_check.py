"""Whether a process's storage settings reach the deployment's storage: the one the API stored the datasets in.

A worker host whose QLORA_STORAGE_URL named another bucket or prefix, or that lacked it (its own
file://$QLORA_HOME/storage), or whose QLORA_S3_ENDPOINT_URL named another store, took every job of its queue and
failed it ("the worker failed: NoSuchBucket", a dataset "not found"), the user's job blamed for the host's
settings, one job after another. The check looks for the newest datasets' objects where this process would read
them; where none is there the settings are another storage's. A store out of reach says nothing of the settings:
the process starts, and its attempts wait for storage as they do for an outage later.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.config import Settings
from app.operations import repository
from app.storage.base import Storage, storage_out_of_reach

LOOKED_FOR = 3  # datasets: one deleted between the query and the look must not count as a mismatch


def storage_problem(session: Session, storage: Storage, settings: Settings) -> str | None:
    """None where `storage` holds the newest datasets' objects (or the deployment has none yet and the store
    answers); else what is wrong, naming the settings to compare with the API's. Storage out of reach: None."""
    keys = repository.newest_stored_keys(session, LOOKED_FOR)
    where = _settings_named(settings)
    try:
        if not keys:
            storage.now()  # an answer from the store (a bucket that does not exist is refused here)
            return None
        if any(storage.exists(key) for key in keys):
            return None
    except Exception as exc:
        if storage_out_of_reach(exc):
            return None
        return f"storage refuses this process ({where}): {str(exc).splitlines()[0][:300]}"
    return (f"storage holds none of the newest datasets' objects where this process looks ({where}; e.g. {keys[0]}): "
            "it is not the storage the API stores in. Give every process the API's QLORA_STORAGE_URL, "
            "QLORA_S3_ENDPOINT_URL and credentials")


def _settings_named(settings: Settings) -> str:
    endpoint = f", QLORA_S3_ENDPOINT_URL={settings.s3_endpoint_url}" if settings.storage_url.startswith("s3://") else ""
    return f"QLORA_STORAGE_URL={settings.storage_url}{endpoint}"
