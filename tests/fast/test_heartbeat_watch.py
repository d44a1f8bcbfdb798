"""The training process's judgement of its worker (worker/runner.supervisor_gone): silent once the heartbeat file
has not changed for the deadline, whatever the wall clock says and however seldom the run asks. Each assertion
leans the way a loaded machine cannot flip: "goes on" is asked at once under a long deadline, "stops" only after
a wait of several short deadlines (a late sample only dates a change earlier)."""

from __future__ import annotations

import os
import time

import pytest

from worker.runner import supervisor_gone
from worker.training.protocol import WorkDir

SHORT_S = 0.2  # a deadline to wait out
LONG_S = 600.0  # a deadline no stall of the test machine reaches


@pytest.fixture
def workdir(tmp_path):
    workdir = WorkDir(tmp_path)
    workdir.heartbeat.touch()  # as the worker's _spawn does before it starts the training process
    return workdir


def watch(workdir: WorkDir, deadline_s: float):
    return supervisor_gone(workdir, os.getppid(), deadline_s)


def stop(gone) -> None:
    getattr(gone, "stop", lambda: None)()  # the sampling thread, where there is one


def test_a_heartbeat_file_stepped_back_or_ahead_does_not_stop_the_run(workdir):
    gone = watch(workdir, LONG_S)
    try:
        for step_s in (-3600, 3600, -7200):  # the host's clock stepped, and the worker's next touch
            when = time.time() + step_s
            os.utime(workdir.heartbeat, (when, when))
            assert not gone()
    finally:
        stop(gone)


def test_a_heartbeat_file_unchanged_past_the_deadline_stops_the_run(workdir):
    gone = watch(workdir, SHORT_S)
    try:
        time.sleep(SHORT_S * 3)
        assert gone()
    finally:
        stop(gone)


def test_a_worker_that_froze_while_the_run_was_not_asking_is_silent_from_its_last_touch(workdir):
    """The worker touched the file during the load of a base (no check then), then froze: the run's first
    check, a long while after, stops it; counting the change as fresh trained a deadline more after the
    reaper had given the job to another worker."""
    gone = watch(workdir, SHORT_S)
    try:
        when = time.time() + 1
        os.utime(workdir.heartbeat, (when, when))  # its last touch
        time.sleep(SHORT_S * 3)  # frozen since; the run loads its base
        assert gone()
    finally:
        stop(gone)


def test_a_vanished_heartbeat_file_stops_the_run_after_the_deadline(workdir):
    gone = watch(workdir, SHORT_S)
    try:
        workdir.heartbeat.unlink()  # the work directory, removed under the run
        time.sleep(SHORT_S * 3)
        assert gone()
    finally:
        stop(gone)
