"""Admission control: a job reaches a GPU only if its estimated peak memory fits one.

With GPU classes configured (QLORA_GPU_CLASSES), a new job goes to the smallest class whose memory
holds its estimated peak, and one that fits none is refused with what it needs, what there is, and
what to change. per_device_batch_size "auto" becomes the largest micro-batch that fits that class.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings
from app.errors import DoesNotFit, Invalid, field_errors
from app.models.tables import RegisteredModel
from worker.training.estimate import (
    GIB,
    Estimate,
    advice,
    estimate_peak_memory,
    fit_micro_batch,
    gib,
    with_micro_batch,
)
from worker.training.spec import JobSpec


@dataclass
class Admission:
    gpu_class: str
    spec: JobSpec  # with "auto" resolved when the class is known
    estimate: Estimate | None
    note: str


def admit(settings: Settings, model: RegisteredModel, spec: JobSpec, requested: str | None) -> Admission:
    classes = sorted(settings.gpu_classes.items(), key=lambda item: item[1])
    if requested is not None and settings.gpu_classes and requested not in settings.gpu_classes:
        raise Invalid(f"gpu_class: {requested!r} is not a class the workers serve ({', '.join(settings.gpu_classes)})",
                      details=field_errors([("gpu_class", "unknown GPU class")]), code="invalid_job")
    chosen = requested or settings.default_gpu_class
    if not classes:
        return Admission(chosen, spec, None, "memory not checked: no GPU classes are configured")
    if model.config is None:
        return Admission(chosen, spec, None, f"memory not checked: the registry has no config.json for {model.name}")
    if requested is not None:
        classes = [(requested, settings.gpu_classes[requested])]
    for name, memory_gib in classes:
        budget = int(memory_gib * GIB)
        sized = fit_micro_batch(spec, model.config, budget)
        if sized is None:
            continue  # "auto", and not even a micro-batch of 1 fits this class
        estimate = estimate_peak_memory(sized, model.config)
        if estimate.total <= budget:
            return Admission(name, sized, estimate,
                             f"estimated peak {gib(estimate.total)} of the {gib(budget)} on {name} "
                             f"(micro-batch {sized.training.per_device_batch_size})")
    name, memory_gib = classes[-1]
    budget = int(memory_gib * GIB)
    at_least_one = spec if spec.training.per_device_batch_size != "auto" else with_micro_batch(spec, 1)
    estimate = estimate_peak_memory(at_least_one, model.config)
    largest = sorted(estimate.parts.items(), key=lambda item: -item[1])[:3]
    try_this = advice(at_least_one, model.config, budget)
    raise DoesNotFit(
        f"this job needs about {gib(estimate.total)} of GPU memory (largest parts: "
        + ", ".join(f"{part} {gib(size)}" for part, size in largest)
        + f"); the largest GPU class {'you asked for' if requested else 'the workers serve'}, {name}, has "
        + f"{gib(budget)}. " + (f"It would fit with {' or '.join(try_this)}." if try_this else
                                "It does not fit even with a micro-batch of 1: use a shorter max_seq_length "
                                "or a smaller base model."),
        details={"needed_bytes": estimate.total, "available_bytes": budget, "gpu_class": name,
                 "estimate": estimate.parts, "suggestions": try_this})
