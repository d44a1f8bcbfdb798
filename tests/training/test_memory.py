"""Activation offload and tiled MLPs (training.activation_offload, training.tiled_mlp) change where and
when memory is used, never what is learned: real QLoRA runs of the tiny model with them give the
plain run's loss curve and adapter. Their memory, against the estimate, is in test_estimate.py."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import dataset_bytes
from tests.training.test_recipe import pause_after, short_spec
from worker.training import memory
from worker.training.recipe import TrainingError, run
from worker.training.spec import JobSpec, SpecError

# Micro-batches of 16 demo rows: some 400 tokens, more than one MLP chunk (256 tokens, the tiny model's hidden size).
STEPS = dict(max_steps=12, save_steps=6, per_device_batch_size=16)


def train(model_dir, data, out, *, lora=None, quantization=None, **training):
    spec = short_spec(model_dir, **(STEPS | training))
    spec["lora"] = {**spec.get("lora", {}), **(lora or {})}
    spec["quantization"] = {**spec.get("quantization", {}), **(quantization or {})}
    return run(JobSpec.parse(spec), data["train"], out)


def curve(result) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in map(json.loads, (result.out_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def adapter(result) -> dict[str, torch.Tensor]:
    return load_file(result.out_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def plain(tiny_model_dir, demo_data, tmp_path_factory):
    """The standard recipe, both off."""
    return train(tiny_model_dir, demo_data, tmp_path_factory.mktemp("plain"), activation_offload=False,
                 tiled_mlp=False)


def test_offloaded_activations_give_the_same_run_bit_for_bit(tiny_model_dir, demo_data, tmp_path, plain):
    """The layer inputs go to (pinned) CPU memory and come back as the same bits: the same run."""
    offloaded = train(tiny_model_dir, demo_data, tmp_path, activation_offload=True, tiled_mlp=False)
    s = offloaded.summary
    assert s["spec"]["training"]["activation_offload"] is True
    # Every layer's input went through the offload: 4 layers x the micro-batch's tokens x hidden (256), float32
    # or bf16 as the CPU computes; at most the largest micro-batch's worth at once.
    assert s["offloaded_activation_bytes"] > 0 and plain.summary["offloaded_activation_bytes"] is None
    assert s["offloaded_activation_bytes"] % (4 * 256) == 0
    assert curve(offloaded) == curve(plain)
    want = adapter(plain)
    got = adapter(offloaded)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_tiled_mlps_give_the_same_curve_and_adapter(tiny_model_dir, demo_data, tmp_path, monkeypatch):
    """The MLP is per token, so chunking it computes the same function; only the matmuls' shapes
    change, and with them the order float sums round in. In float32 compute that is float32's
    tolerance; with lora.dropout 0, as with dropout the masks are drawn per chunk (the same training
    in distribution, not step for step)."""
    chunks = []
    split = memory._chunks
    monkeypatch.setattr(memory, "_chunks", lambda x, tile: chunks.append(len(out := split(x, tile))) or out)
    same = dict(lora={"dropout": 0.0}, quantization={"compute_dtype": "float32"}, activation_offload=False,
                max_steps=6)  # float32 on the CPU is the slow path: fewer steps
    straight = train(tiny_model_dir, demo_data, tmp_path / "straight", tiled_mlp=False, **same)
    assert chunks == []
    tiled = train(tiny_model_dir, demo_data, tmp_path / "tiled", tiled_mlp=True, **same)
    assert max(chunks) > 1  # the micro-batches are longer than one chunk (256 tokens for this hidden size)
    got, want = curve(tiled), curve(straight)
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-5)
    a, b = adapter(tiled), adapter(straight)
    for name in b:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), (name, (a[name] - b[name]).abs().max())


def test_both_together_learn_and_resume_exactly(tiny_model_dir, demo_data, tmp_path, plain):
    """Offload and tiling on at once (with the spec's default dropout): the run learns like the plain
    one, and a pause and resume reproduce the uninterrupted run exactly, as for the standard recipe."""
    data = short_spec(tiny_model_dir, **STEPS, activation_offload=True, tiled_mlp=True)
    spec = JobSpec.parse(data)
    paused = run(spec, demo_data["train"], tmp_path / "run", pause=pause_after(5))
    assert paused.status == "paused"
    resumed = run(spec, demo_data["train"], tmp_path / "run", resume=True)
    assert resumed.summary["steps"]["resumed_from"] == 5
    straight = run(spec, demo_data["train"], tmp_path / "straight")
    assert curve(resumed) == curve(straight)
    losses = [loss for _, loss in curve(straight)]
    plain_losses = [loss for _, loss in curve(plain)]
    assert losses[-1] < 0.8 * losses[0]
    assert losses[-1] == pytest.approx(plain_losses[-1], rel=0.15)  # other dropout masks, the same training


def test_offload_the_host_cannot_hold_fails_before_the_base_loads(tiny_model_dir, demo_data, tmp_path):
    """The offloaded activations are pinned as the first step runs: on a host with less memory available than
    they take, the run failed there (for a large model after its load, or the kernel killed it). It now fails at
    setup, before the base loads, saying what it needs and what the host has (`host_memory`: what this run may
    take, as a merge has it; a worker's run asks the host, MemAvailable)."""
    from worker.training.estimate import estimate_peak_memory

    spec = JobSpec.parse(short_spec(tiny_model_dir, **STEPS, activation_offload=True, tiled_mlp=False))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    offloaded = estimate_peak_memory(spec, config).host_bytes
    assert offloaded > 0
    data = dataset_bytes(demo_data["train"])
    need = offloaded + data
    events: list = []
    with pytest.raises(TrainingError) as failed:
        run(spec, demo_data["train"], tmp_path / "out", host_memory=need // 2, sink=events.append)
    assert str(failed.value) == (
        f"training.activation_offload: this job holds {need / 2**30:.2f} GiB of host memory "
        f"(offloaded activations (pinned) {offloaded / 2**30:.2f} GiB, datasets (read and encoded) {data / 2**30:.2f} "
        f"GiB) and this host has {need // 2 / 2**30:.2f} GiB available; try activation_offload false (on a GPU that "
        "holds the activations), a shorter max_seq_length or a smaller micro-batch, or a host with more memory")
    assert not [e for e in events if getattr(e, "type", None) == "base_loaded"]  # failed before the load


def test_datasets_the_host_cannot_hold_fail_before_the_base_loads(tiny_model_dir, demo_data, tmp_path):
    """A run holds its datasets in host memory from start to end, read and encoded (bench/rows_bench.py); a
    billion tokens' took ~76 GB and the kernel killed the process as it encoded them or in training, with nothing
    counting them. The host check counts them now, offload or not, and fails at setup saying what to change."""
    spec = JobSpec.parse(short_spec(tiny_model_dir, **STEPS))
    data = dataset_bytes(demo_data["train"])
    events: list = []
    with pytest.raises(TrainingError) as failed:
        run(spec, demo_data["train"], tmp_path / "out", host_memory=data // 2, sink=events.append)
    assert str(failed.value) == (
        f"dataset: this job holds {data / 2**30:.2f} GiB of host memory (datasets (read and encoded) "
        f"{data / 2**30:.2f} GiB) and this host has {data // 2 / 2**30:.2f} GiB available; try training on fewer rows "
        "per job (a later job can start from this one's adapter), or a host with more memory")
    assert not [e for e in events if getattr(e, "type", None) == "base_loaded"]  # failed before the load
    assert run(spec, demo_data["train"], tmp_path / "roomy", host_memory=data).status == "succeeded"


def test_offload_past_all_the_hosts_memory_fails_before_the_base_loads(tiny_model_dir, demo_data, tmp_path):
    """Without a limit given, a worker's run compares with the host: more than it has in all can never be had, and
    fails at setup. (Less than that but more than is available now is a warning, and the run goes on: the failure
    would be for good, and another job's memory may be free by the first step.)"""
    import psutil

    from worker.training.estimate import estimate_peak_memory

    total = psutil.virtual_memory().total
    spec = JobSpec.parse(short_spec(tiny_model_dir, **{**STEPS, "per_device_batch_size": 256}, activation_offload=True,
                                    tiled_mlp=False, max_seq_length=1_048_576))
    need = estimate_peak_memory(spec, json.loads((tiny_model_dir / "config.json").read_text())).host_bytes
    assert need > total  # the offloaded activations of 256 x 1M tokens: past any host this runs on
    events: list = []
    with pytest.raises(TrainingError, match=f"this host has {total / 2**30:.2f} GiB in all"):
        run(spec, demo_data["train"], tmp_path / "out", sink=events.append)
    assert not [e for e in events if getattr(e, "type", None) == "base_loaded"]


def test_offload_needs_gradient_checkpointing():
    with pytest.raises(SpecError, match="activation_offload: true offloads what gradient checkpointing keeps"):
        JobSpec.parse({"base_model": "m", "training": {"max_steps": 1, "activation_offload": True,
                                                       "gradient_checkpointing": False}})
    # "auto" without checkpointing is fine: it stays off.
    JobSpec.parse({"base_model": "m", "training": {"max_steps": 1, "gradient_checkpointing": False}})


def test_on_the_cpu_auto_is_off(tiny_model_dir, demo_data, tmp_path):
    """No device memory to fit: "auto" resolves to off, and the summary's spec says so."""
    result = train(tiny_model_dir, demo_data, tmp_path, max_steps=2)
    t = result.summary["spec"]["training"]
    assert (t["activation_offload"], t["tiled_mlp"]) == (False, False)


def test_a_failed_device_allocation_is_an_out_of_memory_wherever_it_is_raised():
    from worker.training.memory import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not is_out_of_memory(RuntimeError("expected scalar type BFloat16 but found Float"))


# The tiny model at 16 x 2,048 tokens on a GPU of this memory: it fits with its activations offloaded (64 MiB pinned)
# or its MLPs tiled, and with neither not (tests/training/test_estimate.py measures the estimate against the model).
TIGHT_GPU = 2_290_000_000


def test_auto_does_not_offload_what_the_host_holds_only_without_the_datasets(tiny_model_dir, demo_data, tmp_path):
    """The training process decides "auto" for its GPU against the host's available memory (recipe._fit_to_device),
    and counted only the step's part there: on a host with room for the offloaded activations but not for them
    beside the datasets (which the run holds from start to end, and its host check counts), it turned offload on
    and pinned what the host did not have. It counts the datasets now, as admission and `qlora estimate` do
    (steps_host_budget): it tiles the MLPs instead, which hold nothing on the host."""
    from worker.training.estimate import DATASET_BYTES_PER_TOKEN, estimate_peak_memory
    from worker.training.recipe import QLoRARecipe, _fit_to_device

    spec = JobSpec.parse(short_spec(tiny_model_dir, max_steps=2, per_device_batch_size=16, max_seq_length=2048))
    recipe = QLoRARecipe(spec, demo_data["train"], tmp_path / "out")
    recipe._setup_data()  # what setup() counts the datasets by, before it decides "auto"
    data = dataset_bytes(demo_data["train"])
    assert DATASET_BYTES_PER_TOKEN * recipe.dataset_tokens == data > 0
    config = json.loads((tiny_model_dir / "config.json").read_text())
    offloaded = estimate_peak_memory(with_savers(spec, True, False), config).host_bytes

    def decided(host_available: int) -> tuple:
        t = _fit_to_device(spec, tiny_model_dir, TIGHT_GPU, 1.0, False, host_available, recipe.dataset_tokens).training
        return t.activation_offload, t.tiled_mlp

    assert decided(offloaded + data) == (True, False)  # room for both: offload, the cheaper saver
    assert decided(offloaded + data // 2) == (False, True)  # room for the activations alone: tiling
    assert decided(data // 2) == (False, True)  # the datasets alone do not fit: nothing more pinned (their check fails)


def with_savers(spec: JobSpec, offload: bool, tiled: bool) -> JobSpec:
    from worker.training.estimate import with_training

    return with_training(spec, activation_offload=offload, tiled_mlp=tiled)


def test_a_run_counts_what_the_other_runs_of_its_host_claimed_and_have_not_taken(tiny_model_dir, demo_data, tmp_path):
    """Training processes starting together on one multi-GPU host each checked MemAvailable and decided "auto" by it,
    each seeing the memory the others would take only later (their datasets as encoded, their activations pinned at
    the first step): each passed, and together they held more than the host has. A run now counts what the other
    runs of its host claimed (worker/training/host_claims.py: another process here, claiming all the host has),
    claims what it will hold itself (its datasets until they are encoded, its step's parts until its first step has
    run), and leaves no claim behind."""
    from transformers import TrainerCallback

    from tests.fast.test_host_claims import Claimer
    from worker.training.estimate import estimate_peak_memory
    from worker.training.host_claims import HostClaims
    from worker.training.model import total_host_memory

    claims = tmp_path / "claims"
    total = total_host_memory()
    seen: dict[str, int] = {}

    class Probe(TrainerCallback):  # what another run starting now would count
        def on_train_begin(self, args, state, control, **kwargs):
            seen["training"] = HostClaims(claims).others()

        def on_step_end(self, args, state, control, **kwargs):
            seen.setdefault("after the first step", HostClaims(claims).others())

    other = Claimer(claims)
    try:
        other.say(f"claim {total}")
        events: list = []
        data = short_spec(tiny_model_dir, max_steps=2, per_device_batch_size=4, activation_offload=True, tiled_mlp=False)
        # Named, not "auto": the activations it offloads are 2 or 4 bytes a value as this CPU computes bf16 or not.
        spec = JobSpec.parse(data | {"quantization": {**data.get("quantization", {}), "compute_dtype": "float32"}})
        result = run(spec, demo_data["train"], tmp_path / "out", host_claims=claims, sink=events.append,
                     extra_callbacks=(Probe(),))
        assert result.status == "succeeded"
        [short] = [e for e in events if getattr(e, "type", None) == "host_memory_short"]
        data = dataset_bytes(demo_data["train"])
        offloaded = estimate_peak_memory(spec, json.loads((tiny_model_dir / "config.json").read_text())).host_bytes
        assert short.data == {"host_needed_bytes": offloaded + data, "host_available_bytes": 0,
                              "host_claimed_bytes": total}
        assert f"less {total / 2**30:.2f} GiB that other training runs here claimed" in short.message
        # Once its datasets are encoded, its claim is what its first step takes: the offloaded activations.
        assert seen == {"training": total + offloaded, "after the first step": total}
        assert HostClaims(claims).others() == total  # the run's own claim is gone; the other's stands
    finally:
        other.end()
    assert HostClaims(claims).others() == 0  # the other process ended without withdrawing: its claim counts no more


def test_a_run_picks_its_device_and_hashes_its_data_before_it_waits_for_the_hosts_claims(tiny_model_dir, demo_data,
                                                                                          tmp_path):
    """Every run starting on a host waits for the lock of the host's claims (worker/training/host_claims.py) while
    another holds it. A run held it as it started CUDA (reading its GPU's memory: seconds, and for ever on a GPU
    fallen off its bus) and hashed its datasets (seconds for 2 GiB): each start on the host waited for the others'
    and one hung GPU held up them all. Those come first now; under the lock, only the decision, the check and the
    claim."""
    import threading
    import time

    from tests.fast.test_host_claims import Claimer
    from worker.training.recipe import QLoRARecipe

    claims = tmp_path / "claims"
    other = Claimer(claims)
    recipe = QLoRARecipe(JobSpec.parse(short_spec(tiny_model_dir, max_steps=2)), demo_data["train"], tmp_path / "out",
                         host_claims=claims)
    failed: list[BaseException] = []

    def setup() -> None:
        try:
            recipe.setup()
        except BaseException as exc:
            failed.append(exc)

    starting = threading.Thread(target=setup)
    try:
        other.say("lock")  # another run of the host deciding
        starting.start()
        deadline = time.monotonic() + 120  # no event marks a wait on a lock: watched, with room for a loaded machine
        while not (hasattr(recipe, "device") and hasattr(recipe, "train_sha256")):
            assert starting.is_alive() and time.monotonic() < deadline, \
                f"the run waited for the host's claims before it picked its device and hashed its data {failed}"
            time.sleep(0.05)
        assert not hasattr(recipe, "host_need")  # still waiting: nothing decided or claimed without the lock
    finally:
        other.end()  # the lock goes with its process
        starting.join()
        if recipe.host_claims is not None:
            recipe.host_claims.withdraw()
    assert not failed, failed
    assert recipe.host_need > 0 and recipe.device == "cpu"
