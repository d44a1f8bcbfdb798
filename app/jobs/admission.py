"""Admission control: a job reaches a GPU only if its estimated peak memory fits one.

A job asks only for a GPU class workers serve, and for no more than the operator's ceilings. With GPU
classes configured (QLORA_GPU_CLASSES), a new job goes to the smallest class whose memory holds its
estimated peak, and one that fits none is refused with what it needs, what there is, and what to
change. activation_offload and tiled_mlp "auto" become on where the job would not fit that class
without them, and per_device_batch_size "auto" the largest micro-batch that fits it.

The host (CPU) memory a job holds beside its GPU's (offloaded activations, pinned; a paged optimizer's
overflow) is counted against QLORA_HOST_MEMORY where it gives the class's: a job the GPU holds but the
host cannot is refused (naming training.activation_offload where the job asked for offload), and "auto"
does not turn offload on past it. Without it, the created event says host memory was not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from app.config import Settings
from app.errors import DoesNotFit, Invalid, field_errors
from app.models.tables import RegisteredModel
from worker.training.estimate import (
    GIB,
    Estimate,
    ModelShape,
    advice,
    dataset_host_parts,
    describe_host_memory,
    estimate_peak_memory,
    fit_memory_savers,
    fit_to_gpu,
    gib,
    memory_savers_note,
    steps_host_budget,
    with_micro_batch,
)
from worker.training.spec import JobSpec


@dataclass
class Admission:
    gpu_class: str
    spec: JobSpec  # with "auto" resolved when the class is known
    estimate: Estimate | None
    note: str
    host_parts: dict[str, int] | None = None  # the host memory it holds, by part (Estimate.host_parts), where placed


def host_budget(settings: Settings, gpu_class: str, dataset_tokens: int = 0) -> int | None:
    """The host memory in bytes a job on one GPU of this class may hold (QLORA_HOST_MEMORY), less what its
    datasets of `dataset_tokens` hold (steps_host_budget: the rest is what its steps may hold); None: not known."""
    memory = settings.host_memory.get(gpu_class)
    return steps_host_budget(int(memory * GIB) if memory is not None else None, dataset_tokens)


def host_note(parts: dict[str, int], gpu_class: str, host: int | None) -> str:
    """What the created event says of host memory: what the job holds there (`parts`), against what the class
    has where that is known; nothing for a job that holds none."""
    if not parts:
        return ""
    held = describe_host_memory(parts)
    if host is None:
        return f"; it holds {held}: host memory not checked, QLORA_HOST_MEMORY gives none for {gpu_class}"
    return f"; it holds {held} of the {gib(host)} a worker of {gpu_class} may hold"


def held_parts(step: dict[str, int], datasets: dict[str, int], host: int | None) -> dict[str, int]:
    """What the created event's note names of the host memory a job holds: its step's parts and its datasets';
    where the class's is not known and the step holds none, nothing (every job holds its datasets)."""
    return step | datasets if step or host is not None else {}


def admit(settings: Settings, model: RegisteredModel, spec: JobSpec, requested: str | None,
          reference_adapter: bool = False, dataset_tokens: int = 0) -> Admission:
    """`reference_adapter`: the job keeps a frozen copy of its starting adapter (keeps_reference_adapter);
    `dataset_tokens`: its datasets' token estimates, train and validation, which it holds in host memory for the
    whole run (dataset_host_parts): what its steps may hold there is the class's QLORA_HOST_MEMORY less that."""
    check_ceilings(settings, spec)
    classes = sorted(settings.gpu_classes.items(), key=lambda item: item[1])
    served = settings.served_gpu_classes
    if requested is not None and requested not in served:
        # Refused rather than queued: no worker would ever take it (and its class would become a
        # label on the public /metrics).
        raise Invalid(f"gpu_class: {requested!r} is not a class the workers serve ({', '.join(served)})",
                      details=field_errors([("gpu_class", "unknown GPU class")]), code="invalid_job")
    chosen = requested or settings.default_gpu_class
    if model.config is not None:
        check_trainable(model, spec)
    if not classes:
        return Admission(chosen, spec, None, "memory not checked: no GPU classes are configured")
    if requested is not None and requested not in settings.gpu_classes:
        return Admission(requested, spec, None, f"memory not checked: QLORA_GPU_CLASSES gives no memory for {requested}")
    if model.config is None:
        return Admission(chosen, spec, None, f"memory not checked: the registry has no config.json for {model.name}")
    if requested is not None:
        classes = [(requested, settings.gpu_classes[requested])]
    paging = settings.max_paged_fraction
    data_parts = dataset_host_parts(dataset_tokens)
    held = sum(data_parts.values())
    for name, memory_gib in classes:
        budget, host = int(memory_gib * GIB), host_budget(settings, name, dataset_tokens)
        sized = fit_to_gpu(spec, model.config, budget, paging, reference_adapter, host)
        if sized is None:
            continue  # "auto", and not even a micro-batch of 1 fits this class
        micro = sized.training.per_device_batch_size
        if settings.max_micro_batch and micro != "auto" and micro > settings.max_micro_batch:
            # "auto" sized past the ceiling: a smaller micro-batch needs less memory, so it fits too.
            sized = with_micro_batch(sized, settings.max_micro_batch)
        estimate = estimate_peak_memory(sized, model.config, reference_adapter=reference_adapter)
        if estimate.fits(budget, paging, host):
            paged, step_parts = estimate.paged_bytes(budget), estimate.host_parts(budget)
            return Admission(name, sized, estimate,
                             f"estimated peak {gib(estimate.total)} of the {gib(budget)} on {name} "
                             f"(micro-batch {sized.training.per_device_batch_size}"
                             + memory_savers_note(estimate) + ")"
                             + (f"; {gib(paged)} of the {gib(estimate.pageable_bytes)} of paged optimizer state "
                                "will page to CPU memory at each optimizer step (resident peak "
                                f"{gib(estimate.resident)})" if paged else "")
                             + host_note(held_parts(step_parts, data_parts, host), name, host_budget(settings, name)),
                             step_parts | data_parts)
    name, memory_gib = classes[-1]
    budget, host = int(memory_gib * GIB), host_budget(settings, name, dataset_tokens)
    at_least_one = spec if spec.training.per_device_batch_size != "auto" else with_micro_batch(spec, 1)
    # "auto" savers on: all they save
    at_least_one = fit_memory_savers(at_least_one, model.config, budget, paging, reference_adapter, host)
    estimate = estimate_peak_memory(at_least_one, model.config, reference_adapter=reference_adapter)
    largest = sorted(estimate.parts.items(), key=lambda item: -item[1])[:3]
    try_this = advice(at_least_one, model.config, budget, paging, reference_adapter, host)
    if host is not None and estimate.fits(budget, paging) and not estimate.fits(budget, paging, host):
        if held and estimate.fits(budget, paging, host + held):  # the step fits the host; with the datasets, not
            refuse_for_dataset_memory(estimate.host_parts(budget) | data_parts, name, host + held,
                                      requested is not None)
        refuse_for_host_memory(spec, estimate, name, budget, host + held, requested is not None, try_this, data_parts)
    needs = gib(estimate.total) if not estimate.pageable_bytes else \
        f"{gib(estimate.resident)} resident ({gib(estimate.total)} with its paged optimizer state)"
    if try_this:
        fix = f"It would fit with {' or '.join(try_this)}."
    elif not estimate_peak_memory(at_least_one, model.config, micro_batch=1, seq_len=1,
                                  reference_adapter=reference_adapter).fits(budget, paging):
        # Not even one token fits: the base's weights, the adapter and what goes with it, which no length changes.
        fix = "It does not fit even with the shortest sequences: use a smaller base model (or a smaller lora.r)."
    else:
        fix = "It does not fit even with a micro-batch of 1: use a shorter max_seq_length or a smaller base model."
    raise DoesNotFit(
        f"this job needs about {needs} of GPU memory (largest parts: "
        + ", ".join(f"{part} {gib(size)}" for part, size in largest)
        + f"); the largest GPU class {'you asked for' if requested else 'the workers serve'}, {name}, has "
        + f"{gib(budget)}. " + fix,
        details={"needed_bytes": estimate.total, "resident_bytes": estimate.resident, "available_bytes": budget,
                 "gpu_class": name, "estimate": estimate.parts, "suggestions": try_this})


def refuse_for_dataset_memory(parts: dict[str, int], gpu_class: str, host: int, requested: bool) -> NoReturn:
    """The refusal of a job that fits the GPU memory of `gpu_class`, and whose steps fit its hosts' memory, but not
    beside its datasets, which a run holds in host memory from start to end (dataset_host_parts)."""
    need = sum(parts.values())
    which = "you asked for" if requested else "the workers serve"
    raise DoesNotFit(
        f"this job needs about {describe_host_memory(parts)}, and a worker of {gpu_class}, the largest GPU class "
        f"{which}, may hold {gib(host)} of it (QLORA_HOST_MEMORY). Its datasets are held for the whole run: train on "
        "fewer rows per job (a later job can start from this one's adapter, initial_job_id), or use a class whose "
        "hosts have more memory.",
        details={"host_needed_bytes": need, "host_available_bytes": host, "host_estimate": parts,
                 "gpu_class": gpu_class})


def refuse_for_host_memory(spec: JobSpec, estimate: Estimate, gpu_class: str, budget: int, host: int,
                           requested: bool, try_this: list[str], datasets: dict[str, int] | None = None) -> NoReturn:
    """The refusal of a job whose GPU memory fits `gpu_class` and whose host memory (Estimate.host_parts)
    does not: 422 naming training.activation_offload where the job asked for offload (its own choice is
    what does not fit), else 400 does_not_fit, saying what offload or paging would need (`datasets`: the host
    memory its datasets hold beside it, dataset_host_parts; `host`: the class's, theirs included)."""
    parts = estimate.host_parts(budget) | (datasets or {})
    need = sum(parts.values())
    which = "you asked for" if requested else "the workers serve"
    detail = (f"{describe_host_memory(parts)}, "
              f"and a worker of {gpu_class}, the largest GPU class {which}, may hold {gib(host)} of it "
              f"(QLORA_HOST_MEMORY)")
    fix = f" It would fit with {' or '.join(try_this)}." if try_this else \
        " Use a shorter max_seq_length or a smaller micro-batch, or a class whose hosts have more memory."
    details = {"host_needed_bytes": need, "host_available_bytes": host, "host_estimate": parts,
               "gpu_class": gpu_class, "needed_bytes": estimate.total, "resident_bytes": estimate.resident,
               "available_bytes": budget, "suggestions": try_this}
    if spec.training.activation_offload is True:
        message = f"training.activation_offload: true needs {detail}.{fix}"
        raise Invalid(message, details=field_errors([("training.activation_offload", message)]), code="invalid_job")
    what = "with activation offload, which" if estimate.offload else "by paging its optimizer state, which"
    raise DoesNotFit(f"this job fits the GPU memory of {gpu_class} ({gib(estimate.resident)} resident of "
                     f"{gib(budget)}) only {what} would need {detail}.{fix}", details=details)


def check_trainable(model: RegisteredModel, spec: JobSpec) -> None:
    """Invalid naming base_model where the registered config.json is one the estimate cannot read or a
    model QLoRA cannot train (a mixture of experts): registered before the registry checked for it.
    Invalid naming lora.target_modules where the list names a layer the model's blocks do not have:
    said now, not when a worker loads the model after the job's wait in the queue."""
    try:
        shape = ModelShape.from_config(model.config or {})
    except ValueError as exc:
        raise Invalid(f"base_model: {model.name} cannot be trained here: {exc}",
                      details=field_errors([("base_model", str(exc))]), code="invalid_job") from None
    try:
        shape.check_targets(spec.lora.target_modules)
    except ValueError as exc:
        raise Invalid(f"lora.target_modules: {exc}", details=field_errors([("lora.target_modules", str(exc))]),
                      code="invalid_job") from None


# (setting, the spec's field, its environment variable): what an operator may cap.
CEILINGS = (("max_steps", "max_steps", "QLORA_MAX_STEPS"),
            ("max_seq_length", "max_seq_length", "QLORA_MAX_SEQ_LENGTH"),
            ("max_micro_batch", "per_device_batch_size", "QLORA_MAX_MICRO_BATCH"))


def check_ceilings(settings: Settings, spec: JobSpec) -> None:
    """Invalid naming each training field over its operator ceiling, and the ceiling. Epochs are not
    capped here (their steps depend on the data, once packed); the job time limit bounds them."""
    over = []
    for setting, field, variable in CEILINGS:
        ceiling, asked = getattr(settings, setting), getattr(spec.training, field)
        if ceiling is not None and isinstance(asked, int) and asked > ceiling:
            over.append((f"training.{field}", f"at most {ceiling} on this service ({variable})"))
    if over:
        raise Invalid("; ".join(f"{field}: {message}, got {getattr(spec.training, field.split('.')[1])}"
                                for field, message in over),
                      details=field_errors(over), code="invalid_job")
