"""Object storage for datasets, checkpoints, adapters and merged models.

`storage_from_settings` picks the backend from QLORA_STORAGE_URL; the S3 backend is imported only
when used, so the embedded default needs no boto3.
"""

from app.storage.base import (
    ChecksumMismatch,
    ListedObject,
    ObjectNotFound,
    ObjectWriter,
    Storage,
    StoredObject,
    attachment_disposition,
    make_key,
    storage_from_settings,
)
from app.storage.local import LocalStorage

__all__ = [
    "ChecksumMismatch",
    "ListedObject",
    "LocalStorage",
    "ObjectNotFound",
    "ObjectWriter",
    "Storage",
    "StoredObject",
    "attachment_disposition",
    "make_key",
    "storage_from_settings",
]
