"""Admission control on real model shapes: a job goes to the smallest GPU class that holds its
estimated peak, "auto" becomes the largest micro-batch that fits there, and a job that fits no
class is refused with what it needs, what there is, and changes that would make it fit."""

from __future__ import annotations

import re

import pytest

from app.errors import DoesNotFit, Invalid
from app.jobs.admission import admit
from app.models.tables import RegisteredModel
from tests.fast import conftest
from tests.fast.conftest import make_settings
from tests.model_configs import LLAMA3_8B, LLAMA3_8B_128K, LLAMA3_70B, LLAMA_65B, MIXTRAL_8X7B, PHI3_MINI
from worker.training.estimate import (
    GIB,
    MEMORY_SAVERS,
    estimate_peak_memory,
    fit_memory_savers,
    fit_micro_batch,
    fit_to_device,
    fit_to_gpu,
    resolve_auto_micro_batch,
    with_training,
)
from worker.training.spec import JobSpec

CLASSES = {"h100": 80, "l4": 24}  # in no particular order: admission sorts them by memory


@pytest.fixture
def served(tmp_path):
    """Settings of a deployment whose workers serve an L4 class and an H100 class."""
    return make_settings(tmp_path, gpu_classes=CLASSES, default_gpu_class="h100")


def job_spec(**training):
    """The standard recipe: no activation offload, no tiled MLPs (their "auto" has tests of its own below)."""
    return conftest.job_spec(**{"activation_offload": False, "tiled_mlp": False, **training})


def model(config=LLAMA3_8B, name="llama-3-8b") -> RegisteredModel:
    return RegisteredModel(name=name, hub_id=f"meta-llama/{name}", revision="main", config=config)


def peak(spec, config=LLAMA3_8B) -> int:
    return estimate_peak_memory(spec, config).total


def test_a_small_job_goes_to_the_smallest_class_that_holds_it(served):
    spec = job_spec(per_device_batch_size=1, max_seq_length=2048)
    admitted = admit(served, model(), spec, None)
    assert admitted.gpu_class == "l4" and served.queue_for(admitted.gpu_class) == "gpu-l4"
    assert admitted.spec == spec
    assert admitted.estimate.total == peak(spec) <= 24 * GIB
    assert admitted.note == (f"estimated peak {admitted.estimate.total / GIB:.2f} GiB of the 24.00 GiB on l4 "
                             "(micro-batch 1)")


def test_the_papers_65b_recipe_is_admitted_on_48_gib_saying_its_optimizer_pages(tmp_path):
    paper = job_spec(per_device_batch_size=1, max_seq_length=512, gradient_checkpointing=True)
    paper = paper.model_copy(update={"lora": paper.lora.model_copy(update={"r": 64, "alpha": 16})})
    admitted = admit(make_settings(tmp_path, gpu_classes={"a6000": 48}, default_gpu_class="a6000"),
                     model(LLAMA_65B, "llama-65b"), paper, None)
    e = admitted.estimate
    assert admitted.gpu_class == "a6000" and e.resident <= 48 * GIB < e.total
    assert f"{e.paged_bytes(48 * GIB) / GIB:.2f} GiB of the {e.pageable_bytes / GIB:.2f} GiB of paged optimizer state " \
           "will page to CPU memory at each optimizer step" in admitted.note
    # What pages out is held in host memory: counted where the class's is known (QLORA_HOST_MEMORY), and the
    # job refused where its hosts cannot hold that much.
    paged = e.paged_bytes(48 * GIB)
    assert admitted.host_parts == {"optimizer state paged out": paged}
    assert "host memory not checked, QLORA_HOST_MEMORY gives none for a6000" in admitted.note
    small_hosts = make_settings(tmp_path, gpu_classes={"a6000": 48}, default_gpu_class="a6000", host_memory={"a6000": 0.5})
    with pytest.raises(DoesNotFit) as refused:
        admit(small_hosts, model(LLAMA_65B, "llama-65b"), paper, None)
    assert (f"only by paging its optimizer state, which would need {paged / GIB:.2f} GiB of host memory "
            f"(optimizer state paged out {paged / GIB:.2f} GiB)") in refused.value.message
    assert refused.value.details["host_available_bytes"] == GIB // 2
    # An operator who allows no paging (QLORA_MAX_PAGED_FRACTION=0) refuses it, saying what it needs resident.
    with pytest.raises(DoesNotFit, match="resident"):
        admit(make_settings(tmp_path, gpu_classes={"a6000": 48}, default_gpu_class="a6000", max_paged_fraction=0),
              model(LLAMA_65B, "llama-65b"), paper, None)


def test_a_job_too_large_for_the_small_class_goes_to_the_next(served):
    spec = job_spec(per_device_batch_size=16, max_seq_length=2048)
    assert 24 * GIB < peak(spec) <= 80 * GIB
    admitted = admit(served, model(), spec, None)
    assert admitted.gpu_class == "h100" and admitted.estimate.total == peak(spec)


def test_a_requested_class_is_honoured_when_the_job_fits_it(served):
    spec = job_spec(per_device_batch_size=1)
    assert admit(served, model(), spec, "h100").gpu_class == "h100"


def test_auto_becomes_the_largest_micro_batch_that_fits_the_class(served):
    spec = job_spec(per_device_batch_size="auto", max_seq_length=2048)
    on_l4 = admit(served, model(), spec, None)
    on_h100 = admit(served, model(), spec, "h100")
    for admitted, budget in ((on_l4, 24 * GIB), (on_h100, 80 * GIB)):
        micro = admitted.spec.training.per_device_batch_size
        assert isinstance(micro, int)
        assert peak(job_spec(per_device_batch_size=micro, max_seq_length=2048)) <= budget
        assert peak(job_spec(per_device_batch_size=2 * micro, max_seq_length=2048)) > budget
        assert admitted.estimate.total == peak(admitted.spec) and f"(micro-batch {micro})" in admitted.note
    assert on_l4.gpu_class == "l4" and on_l4.spec.training.per_device_batch_size == 8
    assert on_h100.spec.training.per_device_batch_size == 32
    # Everything else in the spec is the user's, unchanged.
    assert on_l4.spec.model_copy(update={"training": spec.training}) == spec


def test_auto_skips_a_class_where_not_even_one_sequence_fits(served):
    """A 70B base does not fit an L4 at all (its 4-bit weights alone are larger): auto moves on."""
    spec = job_spec(per_device_batch_size="auto", max_seq_length=2048)
    assert peak(job_spec(per_device_batch_size=1, max_seq_length=2048), LLAMA3_70B) > 24 * GIB
    admitted = admit(served, model(LLAMA3_70B, "llama-3-70b"), spec, None)
    assert admitted.gpu_class == "h100" and admitted.spec.training.per_device_batch_size == 4
    assert admitted.estimate.total <= 80 * GIB


def suggestions_applied(spec, suggestion: str):
    """A suggestion from the refusal ("per_device_batch_size 8 with gradient_accumulation_steps 8 ...")
    as the spec a user would send next."""
    changes = dict(re.findall(r"(per_device_batch_size|gradient_accumulation_steps|max_seq_length|"
                              r"gradient_checkpointing|activation_offload|tiled_mlp) (\w+)", suggestion))
    assert changes, suggestion
    values = {k: (v == "true") if v in ("true", "false") else int(v) for k, v in changes.items()}
    return job_spec(**{**spec.training.model_dump(exclude={"max_steps"}), **values})


def test_a_job_that_fits_no_class_it_may_use_is_refused_with_changes_that_fit(served):
    spec = job_spec(per_device_batch_size=16, max_seq_length=2048)
    with pytest.raises(DoesNotFit) as refused:
        admit(served, model(), spec, "l4")
    error = refused.value
    assert (error.status, error.code) == (400, "does_not_fit")
    resident = estimate_peak_memory(spec, LLAMA3_8B).resident
    assert f"needs about {resident / GIB:.2f} GiB resident ({peak(spec) / GIB:.2f} GiB with its paged optimizer state)" \
        in error.message
    assert error.details["resident_bytes"] == resident
    assert "the largest GPU class you asked for, l4, has 24.00 GiB" in error.message
    assert error.details["needed_bytes"] == peak(spec) == sum(error.details["estimate"].values())
    assert error.details["available_bytes"] == 24 * GIB and error.details["gpu_class"] == "l4"
    assert error.details["suggestions"] == [
        "per_device_batch_size 8 with gradient_accumulation_steps 8 (the same effective batch)", "max_seq_length 1024",
        # Tiling alone needs 24.14 GiB resident since a tiled layer's norm phase is counted (its backward's
        # float32 temporaries over 32,768 tokens): it takes offload as well.
        "activation_offload true and tiled_mlp true"]
    assert "It would fit with per_device_batch_size 8" in error.message
    # Each suggestion, taken as it is written, is admitted on the class that refused the job.
    for suggestion in error.details["suggestions"]:
        fixed = suggestions_applied(spec, suggestion)
        assert admit(served, model(), fixed, "l4").gpu_class == "l4", suggestion
    # Same effective batch: the fix changes memory, not the training.
    fixed = suggestions_applied(spec, error.details["suggestions"][0])
    assert fixed.training.per_device_batch_size * fixed.training.gradient_accumulation_steps == 16 * 4


def test_a_job_too_large_for_every_class_names_the_largest(served):
    spec = job_spec(per_device_batch_size=64, max_seq_length=8192, gradient_checkpointing=False)
    with pytest.raises(DoesNotFit) as refused:
        admit(served, model(), spec, None)
    assert "the largest GPU class the workers serve, h100, has 80.00 GiB" in refused.value.message
    assert refused.value.details["available_bytes"] == 80 * GIB


@pytest.mark.parametrize("micro_batch", [1, "auto"])
def test_a_base_model_too_large_even_for_one_sequence_says_so(tmp_path, micro_batch):
    only_l4 = make_settings(tmp_path, gpu_classes={"l4": 24}, default_gpu_class="l4")
    spec = job_spec(per_device_batch_size=micro_batch, max_seq_length=2048)
    with pytest.raises(DoesNotFit) as refused:
        admit(only_l4, model(LLAMA3_70B, "llama-3-70b"), spec, None)
    error = refused.value
    assert error.details["suggestions"] == []
    # 70B's 4-bit weights alone (36 GiB) are more than the L4's 24: no shorter max_seq_length helps, and the
    # message said to try one.
    assert error.message.endswith("It does not fit even with the shortest sequences: use a smaller base model "
                                  "(or a smaller lora.r).")
    # Where a shorter max_seq_length would fit, though not half or a quarter of this one, it says that.
    eight = make_settings(tmp_path, gpu_classes={"small": 8}, default_gpu_class="small")
    with pytest.raises(DoesNotFit) as too_long:
        admit(eight, model(), job_spec(per_device_batch_size=micro_batch, max_seq_length=8192), None)
    assert too_long.value.message.endswith("It does not fit even with a micro-batch of 1: use a shorter max_seq_length "
                                           "or a smaller base model.")
    # What it needs is measured at a micro-batch of 1, the least "auto" could have chosen.
    assert error.details["needed_bytes"] == peak(job_spec(per_device_batch_size=1, max_seq_length=2048), LLAMA3_70B)


def test_an_unknown_class_is_invalid_and_lists_the_classes_served(served):
    with pytest.raises(Invalid) as refused:
        admit(served, model(), job_spec(), "tpu")
    error = refused.value
    assert (error.status, error.code) == (422, "invalid_job")
    assert "'tpu' is not a class the workers serve (h100, l4)" in error.message
    assert error.details == [{"field": "gpu_class", "message": "unknown GPU class"}]


@pytest.mark.parametrize("requested", [None, "a100"])
def test_without_classes_configured_memory_is_not_checked(tmp_path, requested):
    """The embedded default: one local worker, whatever its memory; "auto" is resolved where it runs."""
    settings = make_settings(tmp_path, extra_gpu_classes=["a100"])
    spec = job_spec(per_device_batch_size="auto")
    admitted = admit(settings, model(LLAMA3_70B), spec, requested)
    assert admitted.gpu_class == (requested or "default")
    assert admitted.spec == spec and admitted.estimate is None
    assert admitted.note == "memory not checked: no GPU classes are configured"


def test_a_model_registered_without_its_config_is_admitted_unchecked(served):
    spec = job_spec(per_device_batch_size="auto")
    admitted = admit(served, model(config=None, name="mystery"), spec, "l4")
    assert admitted.gpu_class == "l4" and admitted.spec == spec and admitted.estimate is None
    assert admitted.note == "memory not checked: the registry has no config.json for mystery"


def test_admission_and_the_worker_size_auto_the_same_way():
    """One sizing rule serves both: admission on the class's memory, the worker on its GPU's."""
    spec = job_spec(per_device_batch_size="auto", max_seq_length=2048)
    assert fit_micro_batch(spec, LLAMA3_8B, 24 * GIB).training.per_device_batch_size == 8
    assert resolve_auto_micro_batch(spec, LLAMA3_8B, 24 * GIB) == fit_micro_batch(spec, LLAMA3_8B, 24 * GIB)
    assert fit_micro_batch(spec, LLAMA3_70B, 24 * GIB) is None  # not even one sequence fits
    with pytest.raises(ValueError, match=r'"auto" found no micro-batch that fits: even 1 needs 47\.\d\d GiB resident '
                                         r"and the device has 24\.00 GiB"):
        resolve_auto_micro_batch(spec, LLAMA3_70B, 24 * GIB)
    # A fixed micro-batch is the user's; on a CPU (no device budget) "auto" is the default, 4.
    fixed = job_spec(per_device_batch_size=16)
    assert fit_micro_batch(fixed, LLAMA3_8B, 24 * GIB) == fixed == resolve_auto_micro_batch(fixed, LLAMA3_8B, 1)
    assert resolve_auto_micro_batch(spec, LLAMA3_8B, None).training.per_device_batch_size == 4


LONG = {"per_device_batch_size": 1, "max_seq_length": 32768}  # Llama-3-8B on 32k-token documents


def test_32k_tokens_fit_24_gib_with_offload_and_tiling(served):
    plain = job_spec(**LONG)
    assert peak(plain, LLAMA3_8B_128K) > 33 * GIB
    both = admit(served, model(LLAMA3_8B_128K, "llama-3.1-8b"), job_spec(**LONG, activation_offload=True, tiled_mlp=True),
                 "l4")
    e = both.estimate
    assert both.gpu_class == "l4" and e.fits(24 * GIB) and e.total < 16.5 * GIB  # 16.15 GiB: 7.85 to spare
    assert e.offload and e.tiled and e.host_bytes == 32 * 32768 * 4096 * 2  # every layer's bf16 input, in CPU memory
    assert f"activations offloaded to {e.host_bytes / GIB:.2f} GiB of pinned CPU memory and tiled MLPs" in both.note
    # "auto" (the default) turns on the cheapest that fits: here tiling alone (offloading alone does not fit).
    auto = admit(served, model(LLAMA3_8B_128K, "llama-3.1-8b"), conftest.job_spec(**LONG), None)
    t = auto.spec.training
    assert auto.gpu_class == "l4" and (t.activation_offload, t.tiled_mlp) == (False, True)
    assert auto.estimate.fits(24 * GIB) and "tiled MLPs" in auto.note
    assert not estimate_peak_memory(job_spec(**LONG, activation_offload=True), LLAMA3_8B_128K).fits(24 * GIB)
    # Where it fits as it is, auto leaves both off: they cost time.
    roomy = admit(served, model(LLAMA3_8B_128K, "llama-3.1-8b"), conftest.job_spec(**LONG), "h100")
    assert (roomy.spec.training.activation_offload, roomy.spec.training.tiled_mlp) == (False, False)


# Llama 3.1 8B at 32k tokens on a 20 GiB GPU needs offload and tiling (test_a_refusal_suggests_...); its
# offloaded activations take 8.00 GiB of pinned host memory (its optimizer state then stays on the GPU).
OFFLOADED_32K = 32 * 32768 * 4096 * 2


def test_explicit_offload_the_hosts_cannot_hold_is_refused_naming_the_field_with_the_numbers(tmp_path):
    """Where QLORA_HOST_MEMORY gives a class's host memory, a job asking for offload whose pinned activations
    it cannot hold is refused when created, not when the first step pins them two hours after its wait."""
    settings = make_settings(tmp_path, gpu_classes={"l4": 24}, default_gpu_class="l4", host_memory={"l4": 6})
    spec = job_spec(**LONG, activation_offload=True, tiled_mlp=True)
    with pytest.raises(Invalid) as refused:
        admit(settings, model(LLAMA3_8B_128K, "llama-3.1-8b"), spec, None)
    message = refused.value.message
    assert refused.value.details[0]["field"] == "training.activation_offload"
    assert message.startswith("training.activation_offload: true needs 8.00 GiB of host memory "
                              "(offloaded activations (pinned) 8.00 GiB)"), message
    assert "a worker of l4, the largest GPU class the workers serve, may hold 6.00 GiB of it (QLORA_HOST_MEMORY)" in message
    assert "It would fit with max_seq_length 16384." in message
    # Hosts that hold it: admitted, saying what it holds there against what there is.
    roomy = make_settings(tmp_path, gpu_classes={"l4": 24}, default_gpu_class="l4", host_memory={"l4": 16})
    admitted = admit(roomy, model(LLAMA3_8B_128K, "llama-3.1-8b"), spec, None)
    assert admitted.host_parts == {"offloaded activations (pinned)": OFFLOADED_32K}
    assert admitted.note.endswith("; it holds 8.00 GiB of host memory (offloaded activations (pinned) 8.00 GiB) "
                                  "of the 16.00 GiB a worker of l4 may hold"), admitted.note


def test_auto_does_not_offload_past_the_hosts_memory(tmp_path):
    """On a 20 GiB class the 32k job fits only with offload: with hosts too small for its pinned activations
    it goes to a larger class that needs no offload, and where there is none it is refused saying why."""
    llama = model(LLAMA3_8B_128K, "llama-3.1-8b")
    two = make_settings(tmp_path, gpu_classes={"a4500": 20, "h100": 80}, default_gpu_class="h100",
                        host_memory={"a4500": 6, "h100": 100})
    admitted = admit(two, llama, conftest.job_spec(**LONG), None)
    assert admitted.gpu_class == "h100" and admitted.spec.training.activation_offload is False
    # The same classes with hosts that hold it: the smaller class, offloading.
    roomy = make_settings(tmp_path, gpu_classes={"a4500": 20, "h100": 80}, default_gpu_class="h100",
                          host_memory={"a4500": 16})
    admitted = admit(roomy, llama, conftest.job_spec(**LONG), None)
    assert admitted.gpu_class == "a4500" and admitted.spec.training.activation_offload is True
    one = make_settings(tmp_path, gpu_classes={"a4500": 20}, default_gpu_class="a4500", host_memory={"a4500": 6})
    with pytest.raises(DoesNotFit) as refused:
        admit(one, llama, conftest.job_spec(**LONG), None)
    message, details = refused.value.message, refused.value.details
    assert message.startswith("this job fits the GPU memory of a4500 (15.84 GiB resident of 20.00 GiB) only with "
                              "activation offload, which would need 8.00 GiB of host memory "
                              "(offloaded activations (pinned) 8.00 GiB), and a worker of a4500"), message
    assert "may hold 6.00 GiB of it (QLORA_HOST_MEMORY)" in message
    assert (details["host_available_bytes"], details["host_needed_bytes"]) == (6 * GIB, OFFLOADED_32K)
    assert details["host_estimate"] == {"offloaded activations (pinned)": OFFLOADED_32K}
    assert details["suggestions"] == ["max_seq_length 16384"]


def test_without_host_memory_configured_the_note_says_it_was_not_checked(served):
    """Today's behaviour where the operator gave no host memory, but the event says so."""
    admitted = admit(served, model(LLAMA3_8B_128K, "llama-3.1-8b"),
                     job_spec(**LONG, activation_offload=True, tiled_mlp=True), "l4")
    assert admitted.note.endswith("; it holds 8.00 GiB of host memory (offloaded activations (pinned) 8.00 GiB): "
                                  "host memory not checked, QLORA_HOST_MEMORY gives none for l4"), admitted.note
    # A job that holds nothing there says nothing of it.
    assert "host memory" not in admit(served, model(), job_spec(per_device_batch_size=1, max_seq_length=2048), None).note


def test_auto_takes_the_cheapest_saver_that_fits():
    """Offloading (copies beside compute) before tiling (one more MLP forward), both only if neither alone fits."""
    auto = conftest.job_spec(per_device_batch_size=1, max_seq_length=16384)
    needs = {(offload, tiled): estimate_peak_memory(
        with_training(auto, activation_offload=offload, tiled_mlp=tiled), LLAMA3_8B_128K).total
        for offload, tiled in MEMORY_SAVERS}
    assert needs[(False, False)] > needs[(True, False)] > needs[(True, True)]
    assert needs[(False, False)] > needs[(False, True)] > needs[(True, True)]
    between = (needs[(True, False)] + needs[(False, False)]) // 2  # offloading alone fits it
    chosen = fit_memory_savers(auto, LLAMA3_8B_128K, between).training
    assert (chosen.activation_offload, chosen.tiled_mlp) == (True, False)
    tight = needs[(True, True)] + GIB // 4  # only both fit
    chosen = fit_memory_savers(auto, LLAMA3_8B_128K, tight).training
    assert (chosen.activation_offload, chosen.tiled_mlp) == (True, True)
    # Without a budget (the CPU) "auto" is off; a value the user set is kept.
    chosen = fit_memory_savers(auto, LLAMA3_8B_128K, None).training
    assert (chosen.activation_offload, chosen.tiled_mlp) == (False, False)
    mine = conftest.job_spec(per_device_batch_size=1, max_seq_length=16384, tiled_mlp=False)
    chosen = fit_memory_savers(mine, LLAMA3_8B_128K, tight).training
    assert (chosen.activation_offload, chosen.tiled_mlp) == (True, False)
    # Without gradient checkpointing there is nothing to offload: auto leaves it off.
    no_gc = conftest.job_spec(per_device_batch_size=1, max_seq_length=16384, gradient_checkpointing=False)
    assert fit_memory_savers(no_gc, LLAMA3_8B_128K, tight).training.activation_offload is False


@pytest.mark.parametrize(("memory_gib", "suggested"), [(24, "tiled_mlp true"),
                                                      (20, "activation_offload true and tiled_mlp true")])
def test_a_refusal_suggests_the_cheapest_savers_that_make_it_fit(tmp_path, memory_gib, suggested):
    settings = make_settings(tmp_path, gpu_classes={"gpu": memory_gib}, default_gpu_class="gpu")
    spec = job_spec(**LONG)
    with pytest.raises(DoesNotFit) as refused:
        admit(settings, model(LLAMA3_8B_128K, "llama-3.1-8b"), spec, None)
    assert suggested in refused.value.details["suggestions"]
    assert admit(settings, model(LLAMA3_8B_128K, "llama-3.1-8b"), suggestions_applied(spec, suggested), None)


def test_auto_savers_and_micro_batch_are_decided_the_same_way_by_admission_and_the_worker():
    auto = conftest.job_spec(per_device_batch_size="auto", max_seq_length=32768)
    admitted = fit_to_gpu(auto, LLAMA3_8B_128K, 24 * GIB)
    on_worker = fit_to_device(auto, LLAMA3_8B_128K, 24 * GIB)
    assert admitted == on_worker and admitted.training.per_device_batch_size >= 1


def test_the_worker_decides_auto_under_the_operators_max_paged_fraction_as_admission_does():
    """Without GPU classes admission decides nothing and the training process decides "auto" for its GPU
    (recipe._fit_to_device): it paged as much as it liked there, whatever QLORA_MAX_PAGED_FRACTION allowed.
    The paper's 65B recipe on 48 GiB pages 18 % of its optimizer state with no saver on: an operator who
    allows 10 % gets activation offload, and one who allows none a refusal, where the job runs as on admission."""
    auto = JobSpec.parse({"base_model": "llama-65b", "lora": {"r": 64, "alpha": 16}, "training": {
        "max_steps": 10, "per_device_batch_size": "auto", "max_seq_length": 512, "gradient_checkpointing": True}})
    everything = fit_to_device(auto, LLAMA_65B, 48 * GIB)
    assert everything.training.activation_offload is False and everything == fit_to_gpu(auto, LLAMA_65B, 48 * GIB)
    tenth = fit_to_device(auto, LLAMA_65B, 48 * GIB, max_paged_fraction=0.1)
    assert tenth.training.activation_offload is True and tenth == fit_to_gpu(auto, LLAMA_65B, 48 * GIB, 0.1)
    assert fit_to_gpu(auto, LLAMA_65B, 48 * GIB, 0) is None
    with pytest.raises(ValueError, match="found no micro-batch that fits"):
        fit_to_device(auto, LLAMA_65B, 48 * GIB, max_paged_fraction=0)


def test_the_worker_does_not_offload_past_the_memory_its_host_has_available():
    """Without GPU classes the training process decides "auto" for its GPU (recipe._fit_to_device) against the
    memory its host has available, as admission does against QLORA_HOST_MEMORY: the paper's 65B recipe under a
    10 % paging share offloads 0.62 GiB of activations and pages 0.43 GiB; a host with 0.5 GiB available
    gets a refusal saying so, not a run that pins what the host does not have."""
    auto = JobSpec.parse({"base_model": "llama-65b", "lora": {"r": 64, "alpha": 16}, "training": {
        "max_steps": 10, "per_device_batch_size": "auto", "max_seq_length": 512, "gradient_checkpointing": True}})
    roomy = fit_to_device(auto, LLAMA_65B, 48 * GIB, max_paged_fraction=0.1, host_budget_bytes=2 * GIB)
    assert roomy.training.activation_offload is True and roomy == fit_to_device(auto, LLAMA_65B, 48 * GIB, 0.1)
    assert roomy == fit_to_gpu(auto, LLAMA_65B, 48 * GIB, 0.1, host_budget_bytes=2 * GIB)
    with pytest.raises(ValueError, match=r"found no micro-batch that fits: even 1 holds 1\.04 GiB of host memory "
                                         r"and the host has 0\.50 GiB available"):
        fit_to_device(auto, LLAMA_65B, 48 * GIB, max_paged_fraction=0.1, host_budget_bytes=GIB // 2)
    assert fit_to_gpu(auto, LLAMA_65B, 48 * GIB, 0.1, host_budget_bytes=GIB // 2) is None


def test_a_model_registered_before_the_registry_refused_its_kind_is_refused_naming_base_model(served):
    """A mixture of experts (or a broken config.json) in the registry from before it was checked: a 422
    naming base_model, not a 500 from the estimate."""
    for config in (MIXTRAL_8X7B, {**LLAMA3_8B, "hidden_size": "4096"}):
        with pytest.raises(Invalid) as refused:
            admit(served, model(config, name="old"), job_spec(max_seq_length=2048), None)
        assert refused.value.message.startswith("base_model: old cannot be trained here: ")
        assert refused.value.details[0]["field"] == "base_model"


def targeting(spec, *names: str):
    return spec.model_copy(update={"lora": spec.lora.model_copy(update={"target_modules": list(names)})})


def test_target_modules_a_models_blocks_lack_are_refused_at_creation_naming_the_ones_they_have(served, tmp_path):
    """Llama's q_proj and v_proj on Phi-3, whose blocks fuse them into qkv_proj: refused as the job is
    created, with or without GPU classes to check memory against, rather than by the worker after
    the job's wait in the queue."""
    llama_names = targeting(job_spec(max_seq_length=2048), "q_proj", "v_proj")
    for settings in (served, make_settings(tmp_path)):
        with pytest.raises(Invalid) as refused:
            admit(settings, model(PHI3_MINI, name="phi-3-mini"), llama_names, None)
        assert refused.value.message == ("lora.target_modules: no linear layer named 'q_proj', 'v_proj' in a phi3 "
                                         "model's blocks; they have: qkv_proj, o_proj, gate_up_proj, down_proj")
        assert refused.value.details[0]["field"] == "lora.target_modules"
    assert admit(served, model(PHI3_MINI, name="phi-3-mini"), targeting(llama_names, "qkv_proj", "o_proj"), None)
    assert admit(served, model(), llama_names, None).gpu_class == "l4"
    # A family the tables do not know is estimated as a Llama block; its names are the worker's to check.
    unknown = {**LLAMA3_8B, "model_type": "someday"}
    assert admit(served, model(unknown, name="someday"), targeting(llama_names, "wqkv"), None)


def test_a_jobs_datasets_count_against_its_hosts_memory(tmp_path):
    """A run holds its datasets in host memory from start to end (read, and encoded as the trainer's rows:
    DATASET_BYTES_PER_TOKEN, bench/rows_bench.py); a billion-token dataset was killed on the host with nothing
    counting it. Admission counts the datasets' token estimates against QLORA_HOST_MEMORY beside the step's parts:
    a class whose hosts cannot hold them is passed over, and where none can, the job is refused saying so."""
    from worker.training.estimate import DATASET_BYTES_PER_TOKEN, HOST_DATASET

    spec = job_spec(per_device_batch_size=1, max_seq_length=2048)
    tokens = 1_000_000_000
    held = DATASET_BYTES_PER_TOKEN * tokens  # ~45 GiB
    two = make_settings(tmp_path, gpu_classes=CLASSES, default_gpu_class="h100", host_memory={"l4": 16, "h100": 100})
    admitted = admit(two, model(), spec, None, dataset_tokens=tokens)
    assert admitted.gpu_class == "h100"  # the l4 holds the step on its GPU, but its hosts not the datasets
    assert admitted.host_parts == {HOST_DATASET: held}
    assert admitted.note.endswith(f"; it holds {held / GIB:.2f} GiB of host memory (datasets (read and encoded) "
                                  f"{held / GIB:.2f} GiB) of the 100.00 GiB a worker of h100 may hold"), admitted.note
    assert admit(two, model(), spec, None, dataset_tokens=1_000_000).gpu_class == "l4"  # a small dataset: the l4
    small_hosts = make_settings(tmp_path, gpu_classes=CLASSES, default_gpu_class="h100",
                                host_memory={"l4": 16, "h100": 32})
    with pytest.raises(DoesNotFit) as refused:
        admit(small_hosts, model(), spec, None, dataset_tokens=tokens)
    assert refused.value.message.startswith(
        f"this job needs about {held / GIB:.2f} GiB of host memory (datasets (read and encoded) {held / GIB:.2f} GiB), "
        "and a worker of h100, the largest GPU class the workers serve, may hold 32.00 GiB of it (QLORA_HOST_MEMORY). "
        "Its datasets are held for the whole run"), refused.value.message
    assert refused.value.details["host_needed_bytes"] == held
    # The memory savers left "auto" (the default): a host that cannot hold the datasets has nothing to spare for a step,
    # so "auto" is decided as for none, not with every saver on, which named 0.50 GiB of pinned activations that an
    # 8B at 2,048 tokens on an H100 never offloads.
    with pytest.raises(DoesNotFit) as refused:
        admit(small_hosts, model(), conftest.job_spec(per_device_batch_size=1, max_seq_length=2048), None,
              dataset_tokens=tokens)
    assert refused.value.message.startswith(f"this job needs about {held / GIB:.2f} GiB of host memory (datasets (read "
                                            f"and encoded) {held / GIB:.2f} GiB), "), refused.value.message
    assert refused.value.details["host_needed_bytes"] == held
    # Without QLORA_HOST_MEMORY nothing changes, and the note says nothing of a step that holds no host memory.
    unknown = admit(make_settings(tmp_path, gpu_classes=CLASSES, default_gpu_class="h100"), model(), spec, None,
                    dataset_tokens=tokens)
    assert unknown.gpu_class == "l4" and "host memory" not in unknown.note
    assert unknown.host_parts == {HOST_DATASET: held}
