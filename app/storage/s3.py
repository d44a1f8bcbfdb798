"""S3 and S3-compatible stores (MinIO, Ceph, R2...) through boto3.

Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID..., ~/.aws, instance role).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from app.config import MIB
from app.storage.base import (
    READ_CHUNK,
    ListedObject,
    ObjectNotFound,
    StorageBase,
    WriterBase,
    attachment_disposition,
    check_key,
    check_prefix,
    check_span,
)

log = logging.getLogger(__name__)

# The least part size: above S3's 5 MiB minimum part, and one part is what a writer holds in memory.
PART_SIZE = 8 * MIB
# S3 and MinIO take at most 10,000 parts of at most 5 GiB each, and Cloudflare R2 only parts of one size (but the
# last). 10,000 parts of 8 MiB end at 78 GiB, short of a 65B model merged in bfloat16 (130 GB; 70B: 140 GB), which
# the streaming merge writes: its upload was refused at part 10,001, after the whole training and merge, and the job
# failed ("Part number must be an integer between 1 and 10000"), every attempt alike. So each upload has one part
# size, from the size its writer expects (writer(key, expected_size)): that size spread over PLANNED_PARTS, the
# rest of the 10,000 room for what a tar adds to the files it holds (16 MiB parts for 140 GB).
MAX_PARTS = 10_000
MAX_PART_SIZE = 5 << 30
PLANNED_PARTS = 9_000


def part_size_for(expected_size: int | None, least: int = PART_SIZE, planned_parts: int = PLANNED_PARTS) -> int:
    """The one part size of an upload expected to be `expected_size` bytes (None: not known, at most `least`
    x MAX_PARTS): `least`, or what spreads it over `planned_parts` parts, in whole MiB."""
    if not expected_size:
        return least
    spread = -(-expected_size // planned_parts)
    return min(max(least, -(-spread // MIB) * MIB), MAX_PART_SIZE)


def _is_missing(err: ClientError) -> bool:
    return err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


class S3Writer(WriterBase):
    """Holds at most one part in memory (8 MiB, more for an upload expected past 70 GiB: part_size_for): small
    objects go up in one put at commit, larger ones as a multipart upload that becomes visible only when completed."""

    def __init__(self, client, bucket: str, key: str, s3_key: str, part_size: int):
        super().__init__(key)
        self._client = client
        self._bucket = bucket
        self._s3_key = s3_key
        self._part_size = part_size
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict] = []

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = self._part_size - len(self._buffer)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == self._part_size:
                self._upload_part()

    def _upload_part(self) -> None:
        if self._upload_id is None:
            upload = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._s3_key)
            self._upload_id = upload["UploadId"]
        number = len(self._parts) + 1
        if number > MAX_PARTS:  # said here, in our words, rather than as the store's refusal of the part
            raise ValueError(f"{self.key}: past {MAX_PARTS:,} parts of {self._part_size / MIB:g} MiB, more than the "
                             "writer was told to expect (expected_size)")
        part = self._client.upload_part(
            Bucket=self._bucket, Key=self._s3_key, UploadId=self._upload_id, PartNumber=number, Body=self._buffer
        )
        self._parts.append({"PartNumber": number, "ETag": part["ETag"]})
        self._buffer = bytearray()

    def _commit(self, sha256: str) -> None:
        if self._upload_id is None:
            self._client.put_object(
                Bucket=self._bucket, Key=self._s3_key, Body=self._buffer, Metadata={"sha256": sha256}
            )
            self._buffer = bytearray()
            return
        if self._buffer:
            self._upload_part()
        # No sha256 metadata here: it is known only now, after the upload was created. The
        # database holds every object's sha256, and that is what downloads are checked against.
        self._client.complete_multipart_upload(
            Bucket=self._bucket, Key=self._s3_key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
        )

    def _abort(self) -> None:
        self._buffer = bytearray()
        if self._upload_id is None:
            return
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._s3_key, UploadId=self._upload_id)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
        self._upload_id = None


class S3Storage(StorageBase):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        part_size: int = PART_SIZE,
        planned_parts: int = PLANNED_PARTS,
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size  # the least; see part_size_for()
        self.planned_parts = planned_parts
        config = Config(
            # boto3 >= 1.36 otherwise adds CRC32 checksums to every upload and validates them on
            # download, which several S3-compatible stores reject or do not send.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # MinIO and friends serve buckets as paths, not as DNS names.
            s3={"addressing_style": "path"} if endpoint_url else None,
            retries={"mode": "standard"},
            # botocore presigns with the old SigV2 unless told otherwise (for us-east-1 and any custom
            # endpoint), which AWS regions opened since 2014, and stores that followed them, refuse.
            signature_version="s3v4",
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        # Download links are followed by users, who may reach the store under another name than
        # the servers do (http://minio:9000 inside compose, a public host outside). Signing is
        # local, so a second client for that name costs nothing.
        self.presign_client = (boto3.client("s3", endpoint_url=public_endpoint_url, region_name=region, config=config)
                               if public_endpoint_url else self.client)

    def _s3_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._s3_key(key))
        except ClientError as err:
            if _is_missing(err):
                return None
            raise

    def writer(self, key: str, expected_size: int | None = None) -> S3Writer:
        return S3Writer(self.client, self.bucket, key, self._s3_key(key),
                        part_size_for(expected_size, self.part_size, self.planned_parts))

    def open(self, key: str, *, start: int = 0, length: int | None = None,
             chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        check_span(start, length)
        if length == 0:  # no Range can ask for no bytes; the object must still exist
            self.size(key)
            return iter(())
        request = {"Bucket": self.bucket, "Key": self._s3_key(key)}
        if start or length is not None:
            # S3 sends only these bytes: what comes before `start` is never read.
            request["Range"] = f"bytes={start}-" + ("" if length is None else str(start + length - 1))
        try:
            body = self.client.get_object(**request)["Body"]
        except ClientError as err:
            if _is_missing(err):
                raise ObjectNotFound(key) from None
            if err.response.get("Error", {}).get("Code") == "InvalidRange":  # `start` at or past the end
                return iter(())
            raise
        return self._read(body, chunk_size)

    @staticmethod
    def _read(body, chunk_size: int) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise ObjectNotFound(key)
        return head["ContentLength"]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._s3_key(key))

    def list_objects(self, prefix: str = "") -> Iterator[ListedObject]:
        # ListObjectsV2 lists completed objects only (a multipart upload is one once completed), 1,000 a page.
        # S3 dates a multipart upload's object from when the upload began, not when it was completed.
        check_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield ListedObject(obj["Key"][strip:], obj["Size"], obj["LastModified"].astimezone(UTC))

    def presigned_url(self, key: str, expires_s: int, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._s3_key(key)}
        if filename:
            params["ResponseContentDisposition"] = attachment_disposition(filename)
        return self.presign_client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)

    def now(self) -> datetime:
        """The store's clock, which dates its objects (LastModified) and uploads (Initiated): the Date of its answer
        to a HEAD of the bucket, in whole seconds as LastModified is (S3 and moto cut both down).
        This host's clock may be hours off the store's (NTP down, a VM resumed from suspend): read on it, a sweep
        took an object uploaded a moment ago, its row about to be committed, for a stray, and the reaper aborted
        an upload under way."""
        try:
            answer = self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            # HeadBucket needs s3:ListBucket on the whole bucket; a policy that grants it only under the service's
            # prefix (a shared bucket) refuses it: a listing under the prefix, which the sweep makes anyway, dates too.
            answer = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "",
                                                 MaxKeys=1)
        date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            return parsedate_to_datetime(date).astimezone(UTC)
        except (TypeError, ValueError):  # HTTP/1.1 servers send it; should one not, this host's clock is the one left
            log.warning("the store sent no readable Date header (%r): reading ages on this host's clock", date)
            return datetime.now(UTC)

    def abort_stale_writes(self, older_than_s: float) -> int:
        """Abort multipart uploads nobody finished (a process died mid-write): S3 keeps their parts,
        and bills for them, until told otherwise. Their ages are the store's (now()), as their Initiated is."""
        cutoff = self.now() - timedelta(seconds=older_than_s)
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""):
            for upload in page.get("Uploads", []):
                if upload["Initiated"] < cutoff:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
                    aborted += 1
        return aborted

