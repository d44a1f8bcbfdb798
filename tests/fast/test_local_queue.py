"""The embedded default's queue (app/local_queue.py): a message is in the queue whole or not at all, and a
file there that cannot be read is skipped. The disk fills up for real (tests/full_disk.py)."""

from __future__ import annotations

import logging
import os
import time
from queue import Empty

import pytest
from kombu.exceptions import ChannelError

from app.broker import celery_for
from tests.full_disk import file_size_limit

QUEUE = "gpu-test"


@pytest.fixture
def channel(settings):
    with celery_for(settings).connection_for_write() as connection:
        yield connection.default_channel


def queued(settings) -> list[str]:
    return sorted(p.name for p in (settings.broker_dir / "queue").iterdir())


def test_a_send_on_a_full_disk_leaves_nothing_in_the_queue(settings, channel):
    """kombu wrote the file in place: on a full disk it left an empty one, which ended the local worker."""
    with file_size_limit(16), pytest.raises(ChannelError, match="Cannot add file"):
        channel._put(QUEUE, {"body": "x" * 100})
    assert queued(settings) == []  # neither the message nor the file it was written under
    channel._put(QUEUE, {"body": "job 1"})
    [name] = queued(settings)
    assert name.endswith(f".{QUEUE}.msg") and channel._get(QUEUE) == {"body": "job 1"}


def test_a_message_file_that_cannot_be_read_is_skipped_and_the_next_one_is_read(settings, channel, caplog):
    directory = settings.broker_dir / "queue"
    (directory / f"0000001_a.{QUEUE}.msg").write_bytes(b"")  # an empty file: a send that failed
    (directory / f"0000002_b.{QUEUE}.msg").write_bytes(b'{"body": "jo')  # cut short by a crash
    (directory / f"0000003_c.{QUEUE}.msg").write_bytes(b"\xff\xfe")  # not even text
    channel._put(QUEUE, {"body": "job 2"})
    with caplog.at_level(logging.ERROR, logger="app.local_queue"):
        assert channel._get(QUEUE) == {"body": "job 2"}
    assert len([r for r in caplog.records if "could not be read" in r.getMessage()]) == 3
    assert queued(settings) == []
    with pytest.raises(Empty):
        channel._get(QUEUE)


def test_a_send_killed_before_its_rename_leaves_no_file_past_the_next_opening(settings):
    """A process killed between writing a message and renaming it into the queue left its hidden file for
    ever; a channel's opening removes those no send can still be writing (PARTIAL_MAX_AGE_S)."""
    directory = settings.broker_dir / "queue"
    directory.mkdir(parents=True, exist_ok=True)
    abandoned = directory / f".0000001_a.{QUEUE}.msg.partial"
    in_progress = directory / f".0000002_b.{QUEUE}.msg.partial"
    for path in (abandoned, in_progress):
        path.write_bytes(b'{"body": "jo')
    an_hour_ago = time.time() - 3600
    os.utime(abandoned, (an_hour_ago, an_hour_ago))
    with celery_for(settings).connection_for_write() as connection:
        channel = connection.default_channel
        assert not abandoned.exists() and in_progress.exists()  # a send this recent may still be writing
        channel._put(QUEUE, {"body": "job 3"})
        assert channel._get(QUEUE) == {"body": "job 3"}
