"""Turn fault-suite runs into docs/reliability.md.

    for i in 1 2 3; do QLORA_FAULT_REPORT=/tmp/faults-$i.json .venv/bin/python -m pytest -q tests/faults; done
    .venv/bin/python -m tests.faults.report /tmp/faults-*.json > docs/reliability.md
"""

from __future__ import annotations

import json
import platform
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

HOW = {
    "a cancel as the worker stores the adapter":
        "POST /jobs/{id}/cancel while the worker is held after attempt 1 stored its adapter, before it records the "
        "end (fault hook QLORA_FAULT_HOLD_END). The job ends succeeded with its adapter (a cancel cannot undo a "
        "finished run), and its succeeded event says that the cancel came past training.",
    "worker and training process SIGKILLed mid-run":
        "SIGKILL to the worker's process group and its training process while it is held after step 25 of "
        "40 (checkpoint 20 saved; fault hook QLORA_FAULT_HOLD_AT_STEP); a second worker is started. The "
        "reaper requeues the silent job, the new worker resumes from the newest checkpoint.",
    "training process alone SIGKILLed (out of memory)":
        "SIGKILL to the training process alone, as the kernel's out-of-memory killer would, while it is held "
        "after step 15 (checkpoint 10 saved; fault hook QLORA_FAULT_HOLD_AT_STEP); its worker lives on. "
        "The worker records the lost attempt at once (no heartbeat deadline to wait for) and the job's next "
        "attempt, on the same worker, resumes from the newest checkpoint.",
    "out of memory at a training step":
        "torch's OutOfMemoryError at step 7 of 12 for any micro-batch above 4 (fault hook QLORA_FAULT_OUT_OF_MEMORY), "
        "on a job of micro-batch 8 with a checkpoint every 4 steps. The worker queues the job again with "
        "micro-batch 4 and gradient accumulation 2 (the same rows per step), written into its spec; the next "
        "attempt resumes from the checkpoint at step 4. The worker is held before it writes that retry until a "
        "whole heartbeat deadline has passed (fault hook QLORA_FAULT_HOLD_END): its heartbeats go on, so the "
        "reaper leaves the attempt alone.",
    "worker stopped with SIGTERM (a deploy) mid-run":
        "SIGTERM to the worker's main process alone, as `docker stop` sends it, while the run is held after "
        "step 3 of 12 (until the pause the shutdown asks for). The worker "
        "hands the job back: it saves a checkpoint after its current step and is queued again; a second "
        "worker resumes it from that checkpoint. Nothing is trained twice, and no attempt counts as lost. "
        "It and a twin of its name, started while it trains, each run in a process-id namespace of their own "
        "sharing the work directory, as docker-compose's containers do (both have the same pid): the twin "
        "keeps its job.",
    "S3 answering 503 as an attempt fetches its data":
        "The worker's S3 traffic goes through the throttling proxy, which answers the job's dataset "
        "download 503 three times (boto's standard mode tries a request three times). The attempt is lost, "
        "not the job: it is queued again, and the next attempt fetches the data and trains.",
    "training process killed while writing a checkpoint":
        "The training process stalls halfway through streaming checkpoint 20 to S3 (fault hook "
        "QLORA_FAULT_STALL_CHECKPOINT_STEP); worker and trainer are then SIGKILLed. The resume uses "
        "checkpoint 10. (The tiny model's checkpoint is under one 8 MiB part, so nothing of it reached the "
        "store; a larger one leaves an open multipart upload, removed as stale as in the API-kill fault.)",
    "the same job message delivered twice":
        "A second copy of the job's Celery message is sent before a worker starts.",
    "20 workers claiming one job at once":
        "20 threads, each with its own Postgres connection, call the claim at the same instant.",
    "worker frozen (SIGSTOP) past the heartbeat deadline":
        "SIGSTOP to the worker (not its training process) for longer than the 5 s heartbeat deadline; a "
        "second worker takes the job over; then SIGCONT. The frozen worker's training process stops by "
        "itself, and the woken worker's writes are refused (its attempt number is stale).",
    "worker frozen inside a database transaction":
        "A job is claimed, then its row is updated on a connection made as a worker makes them, and the "
        "transaction is left open: what a worker frozen while it reports leaves behind. Postgres ends that "
        "transaction after the heartbeat deadline (the worker's idle_in_transaction_session_timeout), so "
        "the reaper's requeue, which needs the row, goes through.",
    "Redis stopped for 15 s mid-job":
        "redis-server shut down (nosave) while a 40-step job trains, restarted 15 s (three heartbeat "
        "deadlines) later. The training process holds after step 20 until the outage is over (fault hook "
        "QLORA_FAULT_HOLD_AT_STEP), so the whole outage falls inside the run however fast the machine trains.",
    "cancelled jobs, then the worker restarted":
        "A queued job and a running job are cancelled, the worker gets SIGTERM (its unacknowledged "
        "messages go back to the queue) and a new worker starts.",
    "API SIGKILLed during a 200 MiB upload":
        "SIGKILL to an API process 13 MiB into a streamed upload (an S3 multipart upload is open); a new "
        "API process starts (with QLORA_STALE_UPLOAD_S=3) and removes the dead upload.",
    "a worker's claim failed (database unreachable)":
        "A worker whose QLORA_DATABASE_URL points at a closed port takes the job's message; its claim "
        "fails and Celery acknowledges the message. The scheduler sends the still-queued job again "
        "QLORA_REDISPATCH_AFTER_S (4 s here) after it was sent, and a healthy worker claims it.",
    "artifact upload lasting 3x the heartbeat deadline":
        "The worker's S3 traffic goes through a throttling HTTP proxy (tests/faults/throttle.py) that "
        "stretches the adapter's upload to 15 s, three 5 s heartbeat deadlines. The job must succeed on "
        "its first attempt, its artifact kept and downloadable with the recorded sha256.",
    "quantized base download lasting 3x the heartbeat deadline":
        "The same proxy stretches the download of the cached 4-bit base to 15 s; the job must succeed on "
        "its first attempt, trained on that base.",
    "a job past QLORA_JOB_TIME_LIMIT_S":
        "A worker with QLORA_JOB_TIME_LIMIT_S=30 runs a job whose training process holds after step 2. "
        "Survived means: failed on its first attempt with an error naming the limit, never requeued as a "
        "lost worker, its training process stopped.",
    "the database dropped the connection as a claim's commit landed":
        "The claim runs in the test's process (the worker's JobRun) through the cuttable link, which is cut as the"
        " claim's COMMIT answer arrives, without passing it on: the claim took the job, and the worker never "
        "heard. The link is restored once a retry has met the outage. Two jobs are queued in the class: the claim "
        "tried again must come back with the first (found by its claim token), the second still queued, never "
        "claimed.",
    "the database out of reach as an attempt prepares":
        "The worker's database traffic goes through the cuttable link, its S3 traffic through the throttling "
        "proxy, which cuts the link for 1.5 s as the store answers the job's dataset download: the pre-quantized "
        "base's lookup that follows meets the outage. The job must succeed on attempt 1, never requeued.",
    "the database out of reach as a worker hands back an attempt (killed)":
        "The training process is SIGKILLed while held at step 3; the worker is held before it writes the lost "
        "attempt (fault hook QLORA_FAULT_HOLD_END), the link is cut for 1.5 s and the worker released. The job "
        "must be queued again by the worker itself (its requeued event names the SIGKILL), not by the reaper as a "
        "silent worker's.",
    "the database out of reach as a worker hands back an attempt (out_of_memory)":
        "As above, with torch's OutOfMemoryError at step 2 for a micro-batch above 4 (QLORA_FAULT_OUT_OF_MEMORY): "
        "the worker must queue the job again with micro-batch 4 itself, not leave it for the reaper, which "
        "requeued it with the micro-batch that did not fit.",
    "a worker host's wall clock stepped an hour ahead mid-run":
        "While the training process is held after step 3 of 6, the test sets the work directory's heartbeat file an "
        "hour back, five times, each until the worker's next touch: what the training process sees when its host's "
        "clock steps an hour ahead (NTP, a VM resumed). The job must succeed on attempt 1, neither cancelled nor "
        "requeued.",
    "worker killed after its artifacts were recorded; the next attempt could not merge":
        "The worker is held once attempt 1 has recorded its adapter and merged model, before its final state "
        "(QLORA_FAULT_HOLD_END), and SIGKILLed; a process claiming more host memory than there is leaves attempt 2 "
        "no room to merge (merge_skipped). The job must succeed with the adapter alone, attempt 1's objects gone.",
    "a worker cut off from the database while its run finished":
        "The worker's database link is cut until the reaper has queued its job again; its run, released, finishes "
        "cut off (checkpoint 4, the quantized base for the cache); the link is restored and the worker finds its "
        "lease lost. Nothing it stored may be left in storage unrecorded.",
}


def main(paths: list[str]) -> str:
    totals: dict[str, dict] = defaultdict(lambda: {"runs": 0, "injected": 0, "survived": 0, "steps_lost": []})
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            t = totals[row["fault"]]
            t["runs"] += 1
            t["injected"] += row["injected"]
            t["survived"] += row["survived"]
            t["steps_lost"].append(row["steps_lost"])
    lines = [
        "# Reliability: what the fault-injection suite shows",
        "",
        f"Measured {date.today().isoformat()} on {platform.machine()} / {platform.system()}, "
        f"{len(paths)} full runs of `tests/faults` (`make test` runs it once each time), against real Postgres, "
        "Redis, Celery workers and S3 over HTTP (moto's server), training the tiny model on the CPU. The "
        "suite's deployment uses a 5 s heartbeat deadline and a 1 s reaper interval so that lost workers are "
        "noticed in seconds; production defaults are 120 s and 15 s.",
        "",
        "A job *survived* when it ended `succeeded` (or, for the cancel fault, stayed `cancelled`) with its "
        "exact planned step count, one training run at a time, and every step exactly once in its loss curve. "
        "*Steps lost* is the training redone: the last step the service had recorded when the fault hit, "
        "minus the checkpoint the next attempt resumed from (with `save_steps` 10).",
        "",
        "| fault | injected | jobs survived | steps lost (each run) |",
        "| --- | ---: | ---: | --- |",
    ]
    for fault, t in totals.items():
        lines.append(f"| {fault} | {t['injected']} | {t['survived']} | {', '.join(map(str, t['steps_lost']))} |")
    lines += ["", "## How each fault is injected", ""]
    for fault in totals:
        lines.append(f"- **{fault}**: {HOW.get(fault, '')}")
    lines += [
        "",
        "## What makes it hold",
        "",
        "- Postgres is the truth; every status change is a compare-and-set on (status, attempt). The claim "
        "takes attempt + 1, and every later write of a worker is fenced by its attempt, so a worker that lost "
        "its job cannot change it any more.",
        "- Heartbeats every `QLORA_SUPERVISE_INTERVAL_S` from a thread of the worker, from the claim to the "
        "final state, through downloads and uploads of any length; the reaper (in the API process holding "
        "its lease) requeues "
        "jobs silent for `QLORA_HEARTBEAT_DEADLINE_S` and pauses them (resumable) after `QLORA_MAX_ATTEMPTS`.",
        "- A queued job still unclaimed `QLORA_REDISPATCH_AFTER_S` after it was sent is sent again by the scheduler while "
        "a worker of its class is idle (behind busy workers its message is waiting, not lost); the claim, a "
        "compare-and-set, makes the duplicate harmless.",
        "- Past `QLORA_JOB_TIME_LIMIT_S` the worker stops the attempt and records the job failed, naming the "
        "limit; it is not retried.",
        "- A checkpoint is uploaded whole before its row is written; resume picks the newest row, and the "
        "loss-curve points past it are deleted and logged again.",
        "- The training process stops by itself when its worker dies or stops sending heartbeats: its parent is "
        "gone, or the heartbeat file has not changed for `QLORA_HEARTBEAT_DEADLINE_S` by the training process's own "
        "monotonic clock (never the file's age on the wall clock, which a clock stepped ahead made look stale).",
        "- An attempt that ends with no fault of the job's (its training process killed, storage or the "
        "database out of reach on the way) is the worker's to hand back at once, as the reaper does a silent "
        "worker's: another attempt from the newest checkpoint, up to `QLORA_MAX_ATTEMPTS` (then failed, or paused, "
        "resumable, when the last ended on a full disk or an outage); one stored "
        "artifact of a lost attempt is replaced by the next attempt's, and one the succeeding attempt did not make "
        "(a merged model its host had no room to build) is deleted; an attempt resumed from the last "
        "planned step's checkpoint trains no step more.",
        "- A worker rides out a short database outage in every unit of an attempt's database work, from its "
        "preparation to its end, for up to `QLORA_HEARTBEAT_DEADLINE_S`, each try fenced by the attempt; a claim "
        "tried again first looks for the job its claim token took; and a try unanswered for "
        "`QLORA_WORKER_DATABASE_TIMEOUT_S` (connect timeout, tcp_user_timeout, TCP keepalives) is given up for "
        "the next, so a failover that drops packets cannot hang it.",
        "- Uploads stream into a temp file or an S3 multipart upload that only a commit makes visible; writes "
        "left open by a dead process are removed after `QLORA_STALE_UPLOAD_S`.",
        "- A training step out of memory is not the job's end while its micro-batch can shrink: the worker queues "
        "it again with the micro-batch divided by its smallest factor and the gradient accumulation multiplied "
        "by it (the same rows at each step), written into its spec, and the next attempt resumes from the "
        "newest checkpoint; it is not a lost attempt.",
        "- The reaper prunes pre-quantized bases no job has loaded for `QLORA_QUANTIZED_CACHE_KEEP_DAYS` (30): the "
        "row first, committed, then the object. A worker marks an entry used before it looks it up, so a prune "
        "either went first (the lookup misses) or keeps it; a job whose entry vanishes as it downloads it "
        "quantizes the base afresh, as for a damaged entry (tests/fast/test_quantized_cache_pruning.py, "
        "tests/service/test_quantized_cache.py).",
        "",
        "Regenerate: see the docstring of `tests/faults/report.py`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main(sys.argv[1:]))
