"""What a job trains on and starts from: the dataset format its method needs (a dpo job learns from
`preference` rows, an sft job from the others), and the finished job whose adapter it continues
(`initial_job_id`: SFT first, then DPO from it, as two jobs).

Both are checked before admission, so a job the worker could never run is refused when it is posted,
naming what to change."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.datasets.tables import Dataset
from app.errors import Conflict, Invalid, NotFound, field_errors
from app.jobs import repository, states
from app.jobs.tables import Job
from app.text import has_control_characters
from worker.training.spec import METHOD_FORMATS, STORED, JobSpec, excerpt

ADAPTER = "adapter"  # the artifact a job continues from (the worker unpacks it as the starting adapter)


def check_format(spec: JobSpec, field: str, dataset: Dataset) -> None:
    """422 when the dataset's format is not one the job's method trains on, naming the one it needs."""
    method = spec.method.type
    wanted = METHOD_FORMATS[method]
    if dataset.format is None or dataset.format in wanted:
        return
    if method == "dpo":
        why = (f"method dpo trains on a preference dataset (rows with a preferred and a non-preferred answer), "
               f"but dataset {dataset.id} is {dataset.format}; upload preference rows, or use method sft")
    else:
        owner = next((name for name, formats in METHOD_FORMATS.items() if dataset.format in formats), None)
        why = (f"dataset {dataset.id} is {dataset.format}: a {dataset.format} dataset trains with method "
               f"{owner or '?'}; set method.type to {owner!r}, or upload one of: {', '.join(wanted)}")
    raise Invalid(f"{field}: {why}", details=field_errors([(field, f"method {method} needs format "
                                                                   f"{' or '.join(wanted)}, got {dataset.format}")]),
                  code="invalid_job")


def initial_job(session: Session, team_id: str, job_id: str, spec: JobSpec) -> Job:
    """The team's own finished job whose adapter the new job starts from. 404 for a missing job or
    another team's (the same answer); 409 while it has not succeeded; 422 when it left no adapter or
    was trained on another base model."""
    job = None if has_control_characters(job_id) else repository.get(session, team_id, job_id)
    if job is None:
        raise NotFound(f"initial_job_id: no job {excerpt(job_id)}", details=field_errors([("initial_job_id", "no such job")]))
    if job.status != states.SUCCEEDED:
        later = "" if job.status in states.FINISHED else "; wait until it succeeds"
        raise Conflict(f"initial_job_id: job {job.id} {states.described(job.status)}, and only a job that succeeded has an "
                       f"adapter to start from{later}", code="initial_job_not_ready",
                       details=field_errors([("initial_job_id", f"job {states.described(job.status)}, not succeeded")]))
    if repository.artifact(session, team_id, job.id, ADAPTER) is None:
        raise Invalid(f"initial_job_id: job {job.id} has no adapter artifact to start from",
                      details=field_errors([("initial_job_id", "the job has no adapter artifact")]),
                      code="invalid_job")
    if job.base_model != spec.base_model:
        raise Invalid(f"initial_job_id: job {job.id} was trained on base_model {job.base_model!r}, this job's "
                      f"base_model is {spec.base_model!r}; an adapter only fits the model it was trained on",
                      details=field_errors([("initial_job_id", f"trained on {job.base_model}, not {spec.base_model}")]),
                      code="invalid_job")
    check_lora_shape(job, spec)
    return job


# The lora fields that shape an adapter's weights: a continued adapter keeps them (dropout may change).
LORA_SHAPE = ("r", "alpha", "target_modules", "bias", "use_rslora")


def check_lora_shape(job: Job, spec: JobSpec) -> None:
    """422 when the new job's lora section would build another adapter than the one it continues: the
    engine would refuse it at setup (worker/training/model.load_initial_adapter), after a wait in the queue."""
    try:
        # As stored: a spec accepted before a rule of new requests (a minimum) still has its adapter's shape.
        started = JobSpec.model_validate(job.spec, context=STORED).lora
    except ValueError:
        return  # a spec this release no longer reads: the engine checks the adapter's own config
    differ = [(name, getattr(started, name), getattr(spec.lora, name)) for name in LORA_SHAPE
              if getattr(started, name) != getattr(spec.lora, name)]
    if differ:
        raise Invalid("; ".join(f"lora.{name}: job {job.id}'s adapter has {had!r}, this job asks for {asked!r}"
                                for name, had, asked in differ)
                      + "; a continued adapter keeps its shape: give the initial job's lora section",
                      details=field_errors([(f"lora.{name}", f"the initial job's adapter has {had!r}")
                                            for name, had, _ in differ]),
                      code="invalid_job")
