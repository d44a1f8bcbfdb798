"""The operators' view of the whole service, in Prometheus' text format: aggregates over every
team, naming none (no team's names or ids), so it needs no key."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.jobs import repository, states

# Job durations from minutes (the tiny model) to days (a large model's long run).
DURATION_BUCKETS_S = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)


class Exposition:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(session: Session) -> str:
    """Jobs by status, queue depth, durations of finished jobs, and each training worker's device."""
    out = Exposition()
    out.family("qlora_jobs", "gauge", "Jobs by status.")
    counts = repository.count_by_status(session)
    for status in states.ALL:
        out.sample("qlora_jobs", counts.get(status, 0), status=status)

    out.family("qlora_queue_depth", "gauge", "Queued jobs waiting for a worker, by queue (GPU class).")
    for queue, depth in sorted(repository.queued_by_queue(session).items()):
        out.sample("qlora_queue_depth", depth, queue=queue)

    out.family("qlora_job_duration_seconds", "histogram", "Wall time from claim to end of finished jobs.")
    by_status: dict[str, list[float]] = {}
    for status, started, finished in repository.finished_durations(session):
        by_status.setdefault(status, []).append((finished - started).total_seconds())
    for status, durations in sorted(by_status.items()):
        for bound in DURATION_BUCKETS_S:
            out.sample("qlora_job_duration_seconds_bucket", sum(d <= bound for d in durations), status=status,
                       le=str(bound))
        out.sample("qlora_job_duration_seconds_bucket", len(durations), status=status, le="+Inf")
        out.sample("qlora_job_duration_seconds_sum", round(sum(durations), 3), status=status)
        out.sample("qlora_job_duration_seconds_count", len(durations), status=status)

    devices = sorted(repository.running_devices(session), key=lambda row: row[0])
    out.family("qlora_worker_peak_memory_bytes", "gauge",
               "Peak device memory of the job each worker is training (GPU memory on CUDA, RSS on the CPU).")
    for worker, memory, _ in devices:
        out.sample("qlora_worker_peak_memory_bytes", memory, worker=worker)
    out.family("qlora_worker_gpu_utilization_ratio", "gauge",
               "GPU busy fraction of each training worker, where NVML reports it (absent on CPU workers).")
    for worker, _, utilization in devices:
        if utilization is not None:
            out.sample("qlora_worker_gpu_utilization_ratio", utilization, worker=worker)
    return out.text()
