"""Job states and the only transitions between them. Every change is a compare-and-set on the
status (and, for a worker, on the attempt), so two writers can never both win."""

QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
PAUSING, PAUSED = "pausing", "paused"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"

# A worker owns the job in these: it heartbeats, and its writes carry the attempt number.
WORKER_OWNED = (RUNNING, CANCELLING, PAUSING)
# Not finished: the job still needs its datasets.
ACTIVE = (QUEUED, *WORKER_OWNED, PAUSED)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
# Where a cancel takes a job, from each state it may be cancelled in: at once where no process runs it, else asked to
# stop (its worker records cancelled). A team's cancel (jobs.service) and an admin's forced model removal both.
CANCELS_TO = {QUEUED: CANCELLED, PAUSED: CANCELLED, RUNNING: CANCELLING, PAUSING: CANCELLING}
CANCEL_EVENTS = {CANCELLED: "cancelled", CANCELLING: "cancel_requested"}  # the event each of those records
ALL = (*ACTIVE, *FINISHED)

TRANSITIONS: dict[str, tuple[str, ...]] = {
    QUEUED: (RUNNING, CANCELLED),
    # A running job goes back to queued when its worker is lost (it resumes from a checkpoint), or to
    # paused when its attempts keep ending on a full disk or an outage (runs.attempt_lost).
    RUNNING: (SUCCEEDED, FAILED, CANCELLING, PAUSING, QUEUED, PAUSED),
    # A cancel that arrives as the last step finishes may still end in succeeded: that is the truth.
    CANCELLING: (CANCELLED, SUCCEEDED, FAILED),
    # Pausing saves a checkpoint and stops; a worker lost meanwhile leaves it paused at its newest checkpoint.
    PAUSING: (PAUSED, CANCELLING, SUCCEEDED, FAILED),
    PAUSED: (QUEUED, CANCELLED),
    SUCCEEDED: (),
    FAILED: (),
    CANCELLED: (),
}


def described(status: str) -> str:
    """The status as a sentence says it of a job ("it has succeeded", "it is running"): "it is succeeded" read
    as a typo in every refusal of a finished job."""
    return {SUCCEEDED: "has succeeded", FAILED: "has failed", CANCELLED: "was cancelled"}.get(status, f"is {status}")


def sources_of(target: str) -> tuple[str, ...]:
    """The states a job may be in to move to `target`."""
    return tuple(state for state, targets in TRANSITIONS.items() if target in targets)
