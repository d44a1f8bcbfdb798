"""Job states and the only transitions between them. Every change is a compare-and-set on the
status (and, for a worker, on the attempt), so two writers can never both win."""

QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"

ACTIVE = (QUEUED, RUNNING, CANCELLING)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
ALL = (*ACTIVE, *FINISHED)

TRANSITIONS: dict[str, tuple[str, ...]] = {
    QUEUED: (RUNNING, CANCELLED),
    # A running job goes back to queued when its worker is lost (it resumes from a checkpoint).
    RUNNING: (SUCCEEDED, FAILED, CANCELLING, QUEUED),
    # A cancel that arrives as the last step finishes may still end in succeeded: that is the truth.
    CANCELLING: (CANCELLED, SUCCEEDED, FAILED),
    SUCCEEDED: (),
    FAILED: (),
    CANCELLED: (),
}


def sources_of(target: str) -> tuple[str, ...]:
    """The states a job may be in to move to `target`."""
    return tuple(state for state, targets in TRANSITIONS.items() if target in targets)
