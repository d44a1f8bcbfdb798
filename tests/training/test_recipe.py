"""Real QLoRA training on the CPU with the tiny model: it resumes, pauses, cancels, fails clearly. That the
demo run learns, stops and merges faithfully is checked in test_report.py, beside its report, on one run.

Nothing here mocks transformers, peft, bitsandbytes or trl: NF4 layers, the paged optimizer and
SFTTrainer run for real. Each run takes seconds; the whole module well under two minutes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from tests.full_disk import fill_up
from worker.training.protocol import Event
from worker.training.recipe import TrainingError, run, truncation_warning
from worker.training.spec import JobSpec, SpecError
from worker.training.tiny import demo_rows, demo_spec, write_jsonl
from worker.training.tokenization import EncodeStats


def spec_for(model_dir, **training) -> JobSpec:
    data = demo_spec(str(model_dir))
    data["training"].update(training)
    return JobSpec.parse(data)


SHORT = dict(max_steps=30, save_steps=10, logging_steps=1, eval_steps=1000, per_device_batch_size=8)


def short_spec(model_dir, **overrides):
    data = demo_spec(str(model_dir))
    data["training"].update(SHORT | overrides)
    # No merge and no eval report: what these runs are for ends with the adapter. The report (base and tuned
    # answers, both losses) was two thirds of a short run's time (~2 s of 3); test_report.py checks it.
    data["output"], data["eval"] = {"merge": False}, {"prompts": 0}
    return data


@pytest.fixture(scope="module")
def straight_short_run(tiny_model_dir, demo_data, tmp_path_factory) -> Path:
    """short_spec's run, never interrupted: what the tests of an interrupted run (a crash, a pause) compare
    their resumed run with. Each of them trained this same run of its own."""
    out = tmp_path_factory.mktemp("straight")
    run(JobSpec.parse(short_spec(tiny_model_dir)), demo_data["train"], out)
    return out


def pause_after(steps: int) -> Callable[[], bool]:
    """A pause hook that says yes once `steps` optimizer steps are done: run() asks it once before
    training, then after every step."""
    asked: list[bool] = []

    def pause() -> bool:
        asked.append(True)
        return len(asked) > steps

    return pause


def test_the_truncation_warning_agrees_with_its_counts():
    """The worker's data_truncated event read "1 of 21 training rows were longer ... were truncated"."""
    one = EncodeStats(rows=21, truncated_rows=1)
    assert truncation_warning("training", one, 512) == "1 of 21 training rows was longer than max_seq_length=512 and was truncated"
    several = EncodeStats(rows=1, truncated_rows=1, dropped_rows=1, dropped_lines=[7])
    assert truncation_warning("validation", several, 512) == (
        "1 of 1 validation row was longer than max_seq_length=512 and was truncated; 1 of them had nothing left to "
        "evaluate and is left out (line 7)")
    many = EncodeStats(rows=2000, truncated_rows=1500, dropped_rows=2, dropped_lines=[3, 9])
    assert truncation_warning("training", many, 64) == (
        "1,500 of 2,000 training rows were longer than max_seq_length=64 and were truncated; 2 of them had nothing left "
        "to learn and are left out (lines 3, 9)")


def test_the_cli_progress_bar_goes_to_stderr_so_stdout_holds_the_result_alone(capsys):
    # `qlora train ... | jq` reads stdout: the bar drawn there made it invalid JSON.
    from types import SimpleNamespace

    from worker.training.callbacks import RichProgressCallback

    bar, state = RichProgressCallback(), SimpleNamespace(max_steps=3, global_step=0)
    bar.on_train_begin(None, state, None)
    for step in (1, 2, 3):
        state.global_step = step
        bar.on_step_end(None, state, None)
        bar.on_log(None, state, None, logs={"loss": 1.5})
    bar.on_train_end(None, state, None)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "training" in captured.err and "3/3" in captured.err


def test_resume_after_a_crash_continues_the_same_run(tiny_model_dir, demo_data, tmp_path, straight_short_run):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(short_spec(tiny_model_dir)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "app.cli", "train", str(spec_path), "--data", str(demo_data["train"]),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env=os.environ | {"QLORA_LOG_FORMAT": "auto"})
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-10" / "COMPLETE").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a crash: no cleanup, no final save
    proc.wait()

    # The events a worker records for a job, `qlora train` prints on stderr: on a pipe, as the recipe's records, a
    # JSON object a line. Until now the engine alone said none of them. Routine ones stay out: a checkpoint (step
    # 10's is saved by now) every save_steps, the loss curve's points.
    records = [json.loads(line) for line in proc.stderr.read().decode().splitlines() if line.startswith('{"kind": ')]
    assert [(r["kind"], r["type"], r["level"], r["step"]) for r in records] == [("event", "optimizer_unpaged", "info", 0)], records
    assert "runs unpaged" in records[0]["message"]
    ckpts = out / "checkpoints"
    newest = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*") if (p / "COMPLETE").exists())
    assert newest < 30

    # What a crash in the middle of a save leaves behind: a step dir without its marker, and staging junk.
    half = ckpts / f"step-{newest + 5}"
    half.mkdir(exist_ok=True)
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    (half / "trainer_state.json").write_text("{")
    (ckpts / ".staging" / "checkpoint-99").mkdir(parents=True, exist_ok=True)

    resumed = run(JobSpec.parse(short_spec(tiny_model_dir)), demo_data["train"], out, resume=True)
    assert resumed.summary["steps"] == {"completed": 30, "planned": 30, "resumed_from": newest}

    # Same step count and the same data order: the curve matches a run that was never interrupted.
    def curve(path):
        return {r["step"]: r["train_loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"}
    got, want = curve(out), curve(straight_short_run)
    assert sorted(got) == list(range(1, 31))  # each step logged once: none lost, none doubled
    # Weights, optimizer moments, schedule, RNG and data position all come back exactly, so the
    # resumed steps are the uninterrupted run's to the last bit on the same machine.
    mismatch = {s: (got[s], want[s]) for s in range(newest + 1, 31) if got[s] != want[s]}
    assert not mismatch, mismatch


def test_a_run_a_full_disk_stopped_halfway_through_a_line_of_its_curve_resumes(tiny_model_dir, demo_data, tmp_path):
    """A full disk takes `qlora train` halfway through appending a point to metrics.jsonl: the point is cut short
    there, and the run stops. Its checkpoints are whole; once there is room it resumes from the newest, and the
    curve has each step once. The resume read the cut line as JSON, failed, and failed so every time after,
    until someone mended the file by hand."""
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(short_spec(tiny_model_dir)))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "train", str(spec_path), "--data",
                             str(demo_data["train"]), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-10" / "COMPLETE").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        # Stopped while the disk fills: room for 10 more bytes of the curve, in the middle of its next point
        # (and of anything larger; the next checkpoint comes after that point). No write is cut by the stop itself.
        os.kill(proc.pid, signal.SIGSTOP)
        fill_up(proc.pid, (out / "metrics.jsonl").stat().st_size + 10)
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, stderr.decode()[-2000:]
    text = (out / "metrics.jsonl").read_text()
    assert not text.endswith("\n"), text[-300:]  # the point the full disk cut short
    newest = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())

    resumed = run(JobSpec.parse(short_spec(tiny_model_dir)), demo_data["train"], out, resume=True)
    assert resumed.summary["steps"] == {"completed": 30, "planned": 30, "resumed_from": newest}
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert steps == list(range(1, 31))  # each step logged once: the cut point redone, none doubled


STACK_PROBE = """
import gc, json, os, sys
from worker.training import stack
with stack.loading():
    import worker.training.recipe
import torch
from bitsandbytes.backends.default import ops
print(json.dumps({"compiler_imported": "torch._inductor.compile_fx" in sys.modules,
                  "variable_left": "TORCHDYNAMO_DISABLE" in os.environ, "gc_on": gc.isenabled(),
                  "frozen": gc.get_freeze_count() > 100_000,
                  "bitsandbytes_compiled": any(hasattr(cell.cell_contents, "_torchdynamo_orig_callable")
                                               for cell in ops._dequantize_4bit_compute.__closure__ or ()),
                  "compile_still_wraps": hasattr(torch.compile(lambda x: x), "_torchdynamo_orig_callable")}))
"""


def test_a_training_process_loads_the_stack_without_the_compiler_and_leaves_compile_working():
    """A training process (the worker's, `qlora train`) imports the stack through worker/training/stack.py:
    bitsandbytes' fallback kernels are not wrapped in torch.compile (which imported torch's whole compiler,
    ~1 s of each job's start), and afterwards torch.compile, the environment and the garbage collector
    are as they were. Its training is the same to the bit: test_resume_after_a_crash_continues_the_same_run."""
    done = subprocess.run([sys.executable, "-c", STACK_PROBE], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "compiler_imported": False, "variable_left": False, "gc_on": True, "frozen": True,
        "bitsandbytes_compiled": False, "compile_still_wraps": True}


# The libraries' own warnings a CPU run printed, raised for real, and two like them that must still show.
WARNINGS_PROBE = """
import warnings
from worker.training import stack
with stack.loading():
    import worker.training.recipe
import bitsandbytes, torch
from transformers import LlamaConfig, LlamaForCausalLM
weight = torch.nn.Parameter(torch.ones(8))
optimizer = bitsandbytes.optim.PagedAdamW32bit([weight])
weight.grad = torch.ones(8)
optimizer.step()
LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                             vocab_size=16)).is_gradient_checkpointing
warnings.warn("Paged optimizers are not supported on CPU (said by someone else)")
warnings.warn_explicit("Something else deprecated", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
"""


def test_a_training_process_leaves_out_only_the_libraries_expected_cpu_warnings():
    """`make train-demo` printed bitsandbytes' "Paged optimizers are not supported on CPU. Falling back to non-paged
    optimizer behavior." and transformers' "`is_gradient_checkpointing` is deprecated" (read by peft and trl), which
    no user can act on; the filters match each by its text and module, so the rest still shows."""
    done = subprocess.run([sys.executable, "-c", WARNINGS_PROBE], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Falling back to non-paged optimizer" not in done.stderr and "is_gradient_checkpointing" not in done.stderr
    assert "Paged optimizers are not supported on CPU (said by someone else)" in done.stderr
    assert "FutureWarning: Something else deprecated" in done.stderr


def test_resuming_from_the_last_planned_steps_checkpoint_trains_no_step_more(tiny_model_dir, demo_data, tmp_path):
    """A run lost after its final checkpoint (in the merge, say) is resumed from it. transformers took one
    step more there (step 11 of 10, at the full learning rate): the adapter shipped differed from the
    uninterrupted run's, and the curve had a step past the plan."""
    from safetensors.torch import load_file

    spec = JobSpec.parse(short_spec(tiny_model_dir, max_steps=10, save_steps=10))
    run(spec, demo_data["train"], tmp_path)
    assert (tmp_path / "checkpoints" / "step-10" / "COMPLETE").exists()
    first = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    resumed = run(spec, demo_data["train"], tmp_path, resume=True)
    assert resumed.summary["steps"] == {"completed": 10, "planned": 10, "resumed_from": 10}
    steps = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == list(range(1, 11))
    again = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_a_resumed_runs_tokens_per_second_counts_only_the_tokens_it_trained(tiny_model_dir, demo_data, tmp_path):
    """The summary's tokens/s divided the run's whole count, the tokens of the steps before the checkpoint too (an
    earlier run trained them, in a time not measured here), by this run's training time: a job resumed on another
    worker showed a speed it never had, and one resumed from its last step's checkpoint (a worker lost as it uploaded
    the adapter) 9,098 tokens/s for a run that trained at 877, on a "training" of 0.08 s with no step in it."""
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_steps=10, save_steps=10))
    assert run(spec, demo_data["train"], tmp_path, pause=pause_after(5)).status == "paused"
    resumed = run(spec, demo_data["train"], tmp_path, resume=True)
    assert resumed.summary["steps"] == {"completed": 10, "planned": 10, "resumed_from": 5}
    seen = {r["step"]: r["tokens_seen"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}
    assert resumed.summary["tokens_seen"] == seen[10] > seen[5] > 0
    # Steps 6 to 10's tokens in the time this run trained (the summary's own duration, rounded to the millisecond)
    trained_here = seen[10] - seen[5]
    assert resumed.summary["tokens_per_second"] == pytest.approx(trained_here / resumed.summary["durations_s"]["train"],
                                                                 rel=0.01)
    # From the checkpoint of the last planned step: no step trained here, so no speed to tell.
    again = run(spec, demo_data["train"], tmp_path, resume=True)
    assert again.summary["steps"] == {"completed": 10, "planned": 10, "resumed_from": 10}
    assert again.summary["tokens_seen"] == seen[10] and again.summary["tokens_per_second"] is None


def test_the_last_step_is_always_on_the_curve(tiny_model_dir, demo_data, tmp_path):
    """The trainer logs every logging_steps: a run shorter than that had no curve and no final loss, and
    one past a multiple lost its last steps."""
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_steps=5, save_steps=100, logging_steps=2))
    result = run(spec, demo_data["train"], tmp_path)
    points = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [p["step"] for p in points] == [2, 4, 5]
    assert result.summary["train_loss_final"] == points[-1]["train_loss"]


def test_output_dir_with_checkpoints_is_not_silently_restarted(tiny_model_dir, demo_data, tmp_path):
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_steps=10, save_steps=5))
    run(spec, demo_data["train"], tmp_path)
    with pytest.raises(TrainingError, match="pass --resume"):
        run(spec, demo_data["train"], tmp_path)
    changed = JobSpec.parse(short_spec(tiny_model_dir, max_steps=10, save_steps=5, learning_rate=1e-3))
    with pytest.raises(TrainingError, match="cannot resume: spec differ"):
        run(changed, demo_data["train"], tmp_path, resume=True)


def test_rows_left_with_nothing_to_learn_by_truncation_are_named_in_the_runs_warning(tiny_model_dir, tmp_path):
    """A row whose answer max_seq_length cuts off entirely is left out, not trained as an empty answer, and the run
    says which: its warning said only that rows "were truncated", as if the cut ones trained too (preflight, which
    names them, reads at most its first 50,000 rows)."""
    long = "please answer " * 40
    rows = [{"prompt": "What does the cow say?", "completion": "The cow says moo."},
            {"prompt": long, "completion": "Cut off."},  # the prompt alone fills max_seq_length: nothing to learn
            {"prompt": "Say it long.", "completion": "moo " * 40}]  # cut in its answer: trained, without its EOS
    train = write_jsonl(rows, tmp_path / "train.jsonl")
    validation = write_jsonl(rows[:2], tmp_path / "validation.jsonl")
    events: list = []
    result = run(JobSpec.parse(short_spec(tiny_model_dir, max_steps=1, max_seq_length=32)), train, tmp_path / "run",
                 validation_path=validation, sink=events.append)
    assert result.summary["data"]["train"]["dropped_lines"] == [2]
    warnings = {e.message for e in events if isinstance(e, Event) and e.type == "data_truncated"}
    # bitsandbytes' own warning is left out on the CPU (stack.py); the run says what it does instead, once.
    assert [e.message for e in events if isinstance(e, Event) and e.type == "optimizer_unpaged"] == [
        "on the CPU, training.optimizer paged_adamw_32bit runs unpaged: its state is in host memory already, where "
        "paging would move it on a GPU"]
    assert warnings == {
        "2 of 3 training rows were longer than max_seq_length=32 and were truncated; 1 of them had nothing left "
        "to learn and is left out (line 2)",
        "1 of 2 validation rows was longer than max_seq_length=32 and was truncated; 1 of them had nothing left "
        "to evaluate and is left out (line 2)"}


def test_cancel_hook_stops_training_cleanly(tiny_model_dir, demo_data, tmp_path):
    asked = []

    def cancel() -> bool:  # asked once before training, then once per optimizer step; yes after the third step
        asked.append(True)
        return len(asked) >= 4

    result = run(JobSpec.parse(short_spec(tiny_model_dir)), demo_data["train"], tmp_path, cancel=cancel)
    assert result.status == "cancelled"
    assert len(asked) == 4  # not asked again once it said yes
    assert result.summary["steps"]["completed"] == 3  # stopped right after the step it was asked at
    assert not (tmp_path / "adapter").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "cancelled"


def test_a_cancel_while_the_base_loads_trains_no_step(tiny_model_dir, demo_data, tmp_path):
    """A cancel that came while the model loaded (minutes, for a large one) was first asked after a step:
    one more step of the GPU, and a job saying "cancelled at step 1"."""
    events = []
    result = run(JobSpec.parse(short_spec(tiny_model_dir)), demo_data["train"], tmp_path, cancel=lambda: True,
                 sink=events.append)
    assert result.status == "cancelled" and "steps" not in result.summary
    assert [(e.type, e.step) for e in events if getattr(e, "type", None) in ("started", "cancelled")] == [
        ("started", 0), ("cancelled", 0)]
    assert not (tmp_path / "metrics.jsonl").exists() and not list((tmp_path / "checkpoints").glob("step-*"))
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "cancelled"


def test_a_pause_while_the_base_loads_trains_no_step_and_saves_nothing(tiny_model_dir, demo_data, tmp_path):
    """Likewise a pause (a preemption for another team's job, a worker shutting down): it trained a step and
    saved a checkpoint there, minutes of a large model's GPU for the team that was to have it."""
    events = []
    result = run(JobSpec.parse(short_spec(tiny_model_dir)), demo_data["train"], tmp_path, pause=lambda: True,
                 sink=events.append)
    assert result.status == "paused" and "steps" not in result.summary
    assert [(e.type, e.step, e.message) for e in events if getattr(e, "type", None) in ("started", "paused")] == [
        ("started", 0, "training started"), ("paused", 0, "paused at step 0 before training; it resumes from the start")]
    assert not (tmp_path / "metrics.jsonl").exists() and not list((tmp_path / "checkpoints").glob("step-*"))


def test_a_cancel_after_the_last_step_stops_before_the_merge_and_ends_cancelled(tiny_model_dir, demo_data, tmp_path):
    """Before, only training asked the hook: a cancel during the evaluation, the merge or the report (minutes
    each on a large model) was ignored, and the job ended succeeded."""
    asked = []

    def cancel() -> bool:  # no before training, to every optimizer step (10), the evaluation and the adapter; yes to the merge
        asked.append(True)
        return len(asked) > 13

    spec = short_spec(tiny_model_dir, max_steps=10, save_steps=10)
    spec["output"] = {"merge": True}
    events = []
    result = run(JobSpec.parse(spec), demo_data["train"], tmp_path, cancel=cancel, sink=events.append)
    assert result.status == "cancelled" and len(asked) == 14
    assert result.summary["steps"]["completed"] == 10
    assert (tmp_path / "adapter").exists() and not (tmp_path / "merged").exists()  # stopped before the merge
    assert [e.type for e in events if getattr(e, "type", None) in ("adapter_saved", "merged", "cancelled", "finished")] == [
        "adapter_saved", "cancelled"]
    assert set(result.summary["durations_s"]) == {"setup", "train", "save_adapter", "total"}
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "cancelled"


def test_non_finite_loss_stops_with_the_step_named(tiny_model_dir, demo_data, tmp_path):
    class Diverge(TrainerCallback):
        """Makes the adapter's weights non-finite before step 4, as a diverging run would."""

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if "lora_B" in name:
                            p.fill_(float("inf"))

    events = []
    with pytest.raises(TrainingError, match="diverged at step 4: the loss is nan") as info:
        run(JobSpec.parse(short_spec(tiny_model_dir, save_steps=4)), demo_data["train"], tmp_path,
            sink=events.append, extra_callbacks=(Diverge(),))
    assert "lower learning_rate" in str(info.value)
    assert not (tmp_path / "checkpoints" / "step-4").exists()  # a diverged model is never checkpointed
    assert isinstance(events[-1], Event) and events[-1].type == "failed" and events[-1].level == "error"


def test_pickle_weights_and_unknown_models_are_refused(tmp_path, demo_data):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SpecError, match="pickle weights"):
        run(JobSpec.parse({"base_model": str(pickled), "training": {"max_steps": 1}}), demo_data["train"],
            tmp_path / "o")
    with pytest.raises(SpecError, match="neither a registered model"):
        run(JobSpec.parse({"base_model": "llama-9000", "training": {"max_steps": 1}}), demo_data["train"],
            tmp_path / "o", registry={"tiny": str(pickled)})


def test_fp16_compute_is_refused_on_a_cpu(tiny_model_dir, demo_data, tmp_path):
    data = short_spec(tiny_model_dir)
    data["quantization"] = {"compute_dtype": "float16"}
    with pytest.raises(SpecError, match="quantization.compute_dtype: float16 mixed precision needs a CUDA GPU"):
        run(JobSpec.parse(data), demo_data["train"], tmp_path)


def test_target_modules_that_do_not_exist_are_named(tiny_model_dir, demo_data, tmp_path):
    data = short_spec(tiny_model_dir)
    data["lora"] = {"target_modules": ["q_proj", "query_key_value"]}
    with pytest.raises(SpecError, match="no linear layer named query_key_value; this model has: down_proj"):
        run(JobSpec.parse(data), demo_data["train"], tmp_path)


def test_out_of_memory_names_the_step_the_batch_and_what_to_change(tiny_model_dir, demo_data, tmp_path):
    class RunOutOfMemory(TrainerCallback):
        """What the CUDA allocator raises when a step does not fit (the CPU never raises it)."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(TrainingError) as info:
        run(JobSpec.parse(short_spec(tiny_model_dir)), demo_data["train"], tmp_path,
            extra_callbacks=(RunOutOfMemory(),))
    message = str(info.value)
    assert "out of memory on cpu at step 3 with micro-batch 8 and max_seq_length 64" in message
    assert "per_device_batch_size 4 with gradient_accumulation_steps 2" in message
    assert info.value.smaller == {"per_device_batch_size": 4, "gradient_accumulation_steps": 2}  # the worker goes on

    # A team measuring a fixed micro-batch: the job's end, as a failure, with the same advice.
    data = short_spec(tiny_model_dir)
    data["training"]["on_out_of_memory"] = "fail"
    events: list = []
    with pytest.raises(TrainingError) as info:
        run(JobSpec.parse(data), demo_data["train"], tmp_path / "fail", sink=events.append,
            extra_callbacks=(RunOutOfMemory(),))
    assert info.value.smaller is None
    said = [(e.type, e.level) for e in events if isinstance(e, Event) and e.type in ("failed", "out_of_memory")]
    assert said == [("failed", "error")]
    assert "per_device_batch_size 4 with gradient_accumulation_steps 2" in str(info.value)


def test_out_of_memory_at_a_step_continues_from_the_checkpoint_with_a_smaller_micro_batch_on_the_same_rows(
        tiny_model_dir, demo_data, tmp_path):
    """A step that runs out of memory (the estimate fell short, a fragmented GPU): the run says with what it can
    go on, half the micro-batch and twice the accumulation, and resumed with that from its checkpoint it is the
    same run: the same rows at each optimizer step, so the curve and the adapter of a run never interrupted,
    up to float rounding (smaller pieces pad less and sum in another order). Before, the job failed, and the
    hours before the step were lost unless its team started over with a smaller batch by hand."""
    from worker.runner import FaultOutOfMemory
    from worker.training.recipe import OutOfMemoryInTraining

    data = short_spec(tiny_model_dir, max_steps=12, save_steps=4, per_device_batch_size=8, gradient_accumulation_steps=1)
    # float32 on every CPU: "up to float rounding" is tested at float32's (bf16's would hide a real difference).
    data["quantization"] = {**data.get("quantization", {}), "compute_dtype": "float32"}
    memory = FaultOutOfMemory(step=7, micro_batch=4)  # from step 7 on, more than 4 rows at once do not fit
    events: list = []
    with pytest.raises(OutOfMemoryInTraining) as info:
        run(JobSpec.parse(data), demo_data["train"], tmp_path / "run", sink=events.append, extra_callbacks=(memory,))
    assert info.value.smaller == {"per_device_batch_size": 4, "gradient_accumulation_steps": 2}
    said = [(e.type, e.level, e.message) for e in events if isinstance(e, Event) and e.type in ("failed", "out_of_memory")]
    # Not the run's end where a worker runs it, and no "try ..." for what the worker does itself.
    assert said == [("out_of_memory", "warning", "out of memory on cpu at step 7 with micro-batch 8 and max_seq_length 64")]
    assert "try per_device_batch_size 4 with gradient_accumulation_steps 2" in str(info.value)  # `qlora train`'s end

    other = {**data, "training": {**data["training"], "per_device_batch_size": 4, "gradient_accumulation_steps": 4}}
    with pytest.raises(TrainingError, match="cannot resume: spec differ"):  # other rows per step: another run
        run(JobSpec.parse(other), demo_data["train"], tmp_path / "run", resume=True)
    data["training"].update(info.value.smaller)
    resumed = run(JobSpec.parse(data), demo_data["train"], tmp_path / "run", resume=True, extra_callbacks=(memory,))
    assert resumed.summary["steps"] == {"completed": 12, "planned": 12, "resumed_from": 4}
    assert json.loads((tmp_path / "run" / "run.json").read_text())["spec"]["training"]["per_device_batch_size"] == 4

    straight = {**data, "training": {**data["training"], "per_device_batch_size": 8, "gradient_accumulation_steps": 1}}
    run(JobSpec.parse(straight), demo_data["train"], tmp_path / "straight")

    def curve(path):
        return {r["step"]: r["train_loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"}
    got, want = curve(tmp_path / "run"), curve(tmp_path / "straight")
    assert sorted(got) == list(range(1, 13))
    assert [got[s] for s in range(1, 13)] == pytest.approx([want[s] for s in range(1, 13)], rel=1e-5)  # 2e-7 measured
    from safetensors.torch import load_file

    ours, theirs = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (tmp_path / "run", tmp_path / "straight"))
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() / max(theirs[k].abs().max().item(), 1e-12) for k in ours)
    assert worst < 1e-4, worst  # 3e-6 measured; other rows at a step would be ~1e-2


def test_the_eval_loss_is_per_token_whatever_the_micro_batch(tiny_model_dir, demo_data, tmp_path):
    """The same run in micro-batches of 8, and of 4 with twice the accumulation (what an out-of-memory
    continuation makes of it), evaluated on the same validation rows: the same eval loss, the rows' loss per
    trained token, which the eval report measures row by row (its tuned loss: the adapter as trained, on all
    48 rows). transformers weighs each eval batch's mean by its rows (by 1 where a padding-free batch is one
    row, as with packing), so the batch size moved it: 5.5876 at micro-batch 8, 5.5818 at 4."""
    # Answers of different lengths, as real validation sets have (the demo's all have as many tokens).
    rows = [json.loads(line) for line in Path(demo_data["validation"]).read_text().splitlines()]
    for i, row in enumerate(rows):
        row["messages"][-1]["content"] += " It says it again." * (i % 5)
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps(row) + "\n" for row in rows))
    losses = {}
    for name, micro, accumulation, packing in (("8", 8, 1, False), ("4", 4, 2, False), ("packed", 8, 1, True)):
        data = short_spec(tiny_model_dir, max_steps=4, save_steps=1000, per_device_batch_size=micro,
                          gradient_accumulation_steps=accumulation, packing=packing)
        data["quantization"] = {**data.get("quantization", {}), "compute_dtype": "float32"}  # equal to float32's rounding
        data["eval"] = {"prompts": 1, "max_new_tokens": 2}  # the report's losses, little generation
        result = run(JobSpec.parse(data), demo_data["train"], tmp_path / name, validation_path=validation)
        losses[name] = result.summary["eval_loss_final"]
        assert result.report["metrics"]["loss_rows"] == len(rows)
        assert losses[name] == pytest.approx(result.report["metrics"]["tuned"]["loss"], rel=1e-5), name
    assert losses["4"] == pytest.approx(losses["8"], rel=1e-5), losses


def test_out_of_memory_after_training_fails_the_job_once_naming_the_step_and_keeps_the_adapter(
        tiny_model_dir, demo_data, tmp_path, monkeypatch):
    """The merge of a model whose dense weights outgrow the GPU, say: before, the error escaped the run,
    the worker counted a lost attempt and trained the job again, to the same end, up to three times."""
    from worker.training import recipe

    def dense_model_too_large(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.00 GiB")

    monkeypatch.setattr(recipe, "write_merged", dense_model_too_large)
    data = short_spec(tiny_model_dir, max_steps=2)
    data["output"] = {"merge": True}
    events: list = []
    with pytest.raises(TrainingError) as info:
        run(JobSpec.parse(data), demo_data["train"], tmp_path, sink=events.append)
    assert str(info.value) == ("out of memory on cpu in merging the adapter into the base; try output.merge false "
                               "(the adapter is saved; merge it where there is memory), or a GPU class with more memory")
    assert [e.message for e in events if isinstance(e, Event) and e.type == "failed"] == [str(info.value)]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_merged_model_larger_than_the_gpus_free_memory_is_built_on_the_cpu():
    from worker.training.merge import plan_merge

    gib = 2**30
    machine = dict(merge_dtype="bfloat16", training_device="cuda", gpu_free=78 * gib, host_available=500 * gib,
                   disk_free=1000 * gib, base_bytes=40 * gib, largest_tensor_params=28672 * 8192,
                   shard_bytes=5 * 10**9, streaming_unsupported=None)
    seventy_b, eight_b = plan_merge(dense_bytes=140 * gib, **machine), plan_merge(dense_bytes=16 * gib, **machine)
    assert (seventy_b.how, seventy_b.device) == ("in_memory", "cpu")  # Llama 3 70B in bf16 on an H100
    assert (eight_b.how, eight_b.device) == ("in_memory", "cuda")  # an 8B


def test_pause_saves_a_checkpoint_and_resume_finishes_the_same_run(tiny_model_dir, demo_data, tmp_path, straight_short_run):
    spec = JobSpec.parse(short_spec(tiny_model_dir))
    paused = run(spec, demo_data["train"], tmp_path / "run", pause=pause_after(7))
    assert paused.status == "paused" and paused.summary["steps"]["completed"] == 7
    assert (tmp_path / "run" / "checkpoints" / "step-7" / "COMPLETE").exists()  # saved at the pause, not at 10
    # Paused under a release whose spec had none of the fields added since (the service's releases up
    # to migration 0011 had no lora.dtype, activation_offload, tiled_mlp, early stopping, best checkpoint
    # or method): each takes its default on resume, and activation_offload and tiled_mlp, whose default
    # "auto" this run decides for its device, this run's decision.
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    old = manifest["spec"]
    del old["lora"]["dtype"], old["training"]["activation_offload"], old["training"]["tiled_mlp"]
    del old["training"]["early_stopping"], old["output"]["use_best_checkpoint"], old["method"]
    del manifest["initial_adapter_sha256"]
    (tmp_path / "run" / "run.json").write_text(json.dumps(manifest))

    resumed = run(spec, demo_data["train"], tmp_path / "run", resume=True)
    assert resumed.status == "succeeded"
    assert resumed.summary["steps"] == {"completed": 30, "planned": 30, "resumed_from": 7}

    def curve(path):
        return [(r["step"], r["train_loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert curve(tmp_path / "run") == curve(straight_short_run)  # the uninterrupted run's


def test_a_run_grouped_by_length_resumed_in_its_second_epoch_continues_the_same_run(tiny_model_dir, tmp_path):
    """group_by_length's sampler drew each epoch's order from the global RNG, which a resume restores only after
    the order is drawn: resumed in epoch 2, the run trained other rows than the uninterrupted run (some twice in
    the epoch, others not at all), from a loss of 5.09 against 5.54 at the first step after the resume."""
    rows = demo_rows(0, 40, distinct=True)
    for i, row in enumerate(rows):  # lengths that differ, for the grouping to group
        row["messages"][-1]["content"] += " It says it again." * (i % 7)
    train = write_jsonl(rows, tmp_path / "train.jsonl")
    # 5 steps an epoch; paused after step 7, in the second epoch
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_steps=None, epochs=2, save_steps=100, max_seq_length=128,
                                    group_by_length=True))
    assert run(spec, train, tmp_path / "run", pause=pause_after(7)).status == "paused"
    resumed = run(spec, train, tmp_path / "run", resume=True)
    assert resumed.summary["steps"] == {"completed": 10, "planned": 10, "resumed_from": 7}
    run(spec, train, tmp_path / "straight")

    def curve(path):
        return [(r["step"], r["train_loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert curve(tmp_path / "run") == curve(tmp_path / "straight")


def test_a_grouped_run_begun_by_the_older_release_resumes_in_the_order_it_began_with(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    """A job paused (or preempted, or lost) by the release before EpochSeededLengthGroupedSampler resumes on this one
    from a checkpoint whose first steps were trained in transformers' order (drawn from the global RNG, which that
    release's resume in the first epoch drew again alike). Resumed in the epoch-seeded order, the one-epoch run
    skipped by count the batches it had trained, of another order: some rows twice, others never (a loss of 5.07
    against 5.05 at the first step after the resume). It keeps the order it began with, through a second pause too."""
    from worker.training import recipe
    rows = demo_rows(0, 40, distinct=True)
    for i, row in enumerate(rows):  # lengths that differ, for the grouping to group
        row["messages"][-1]["content"] += " It says it again." * (i % 7)
    train = write_jsonl(rows, tmp_path / "train.jsonl")
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_steps=None, epochs=1, save_steps=100, max_seq_length=128,
                                    group_by_length=True))  # 5 steps, one epoch

    with monkeypatch.context() as older_release:  # its sampler, and no file carried in its checkpoints
        older_release.setattr(recipe.GuardedSFTTrainer, "_get_train_sampler",  # transformers' own
                              lambda self, dataset=None: super(recipe.GuardedSFTTrainer, self)._get_train_sampler(dataset))
        older_release.setattr(recipe.TrainerGuards, "_save_checkpoint",
                              lambda self, model, trial: super(recipe.TrainerGuards, self)._save_checkpoint(model, trial))
        assert run(spec, train, tmp_path / "run", pause=pause_after(2)).status == "paused"
        run(spec, train, tmp_path / "straight")
    assert not (tmp_path / "run" / "checkpoints" / "step-2" / recipe.LOSS_SINCE_LOG_FILE).exists()
    assert run(spec, train, tmp_path / "run", resume=True, pause=pause_after(1)).status == "paused"  # at step 3
    resumed = run(spec, train, tmp_path / "run", resume=True)
    assert resumed.summary["steps"] == {"completed": 5, "planned": 5, "resumed_from": 3}

    def curve(path):
        return [(r["step"], r["train_loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert curve(tmp_path / "run") == curve(tmp_path / "straight")


def test_the_first_point_logged_after_a_resume_is_the_uninterrupted_runs(tiny_model_dir, demo_data, tmp_path):
    """With logging_steps 5, step 10's train loss is the mean of steps 6 to 10. Resumed from a pause at step 7, it
    was the mean of steps 8 to 10 alone (2.908 against 3.134): the steps before the checkpoint since the last log
    are carried in the checkpoint now, so the resumed run logs the same curve."""
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_steps=10, save_steps=100, logging_steps=5))
    assert run(spec, demo_data["train"], tmp_path / "run", pause=pause_after(7)).status == "paused"
    run(spec, demo_data["train"], tmp_path / "run", resume=True)
    run(spec, demo_data["train"], tmp_path / "straight")

    def curve(path):
        return [(r["step"], r["train_loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert [step for step, _ in curve(tmp_path / "straight")] == [5, 10]
    assert curve(tmp_path / "run") == curve(tmp_path / "straight")


def test_a_resume_keeps_what_the_interrupted_run_decided_for_auto(tiny_model_dir, demo_data, tmp_path):
    """per_device_batch_size "auto" is decided on the worker (a model registered without its config). A run
    paused after a release (or a card of the class with other memory) decided 2 resumes with 2, where it
    failed 'cannot resume: spec differ' as soon as this run decided otherwise (4 on the CPU)."""
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_steps=6, save_steps=100, per_device_batch_size="auto"))
    paused = run(spec, demo_data["train"], tmp_path / "run", pause=pause_after(3))
    assert paused.status == "paused" and paused.summary["spec"]["training"]["per_device_batch_size"] == 4
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    manifest["spec"]["training"]["per_device_batch_size"] = 2  # what the interrupted run had decided
    (tmp_path / "run" / "run.json").write_text(json.dumps(manifest))

    resumed = run(spec, demo_data["train"], tmp_path / "run", resume=True)
    assert resumed.status == "succeeded", resumed.summary
    assert resumed.summary["spec"]["training"]["per_device_batch_size"] == 2
    assert resumed.summary["steps"] == {"completed": 6, "planned": 6, "resumed_from": 3}

    # A batch size the job asked for is the job's: a run that differs from it is still refused.
    fixed = JobSpec.parse(short_spec(tiny_model_dir, max_steps=6, save_steps=100, per_device_batch_size=4))
    with pytest.raises(TrainingError, match="cannot resume: spec differ"):
        run(fixed, demo_data["train"], tmp_path / "run", resume=True)


def test_a_bfloat16_adapter_trains_and_resumes_exactly(tiny_model_dir, demo_data, tmp_path):
    """lora.dtype bfloat16 (the paper's): the adapter's weights and gradients are bf16, it learns, and
    "exact" resume means for it what it means for float32: the bf16 weights, the float32 optimizer
    moments, schedule, RNG and data position come back as saved, so the resumed steps are the
    uninterrupted bf16 run's to the last bit (not float32's: small updates round away in bf16)."""
    data = short_spec(tiny_model_dir)
    data["lora"] = {**data.get("lora", {}), "dtype": "bfloat16"}
    spec = JobSpec.parse(data)
    seen = []

    class AdapterDtype(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.extend({p.dtype for p in model.parameters() if p.requires_grad})

    paused = run(spec, demo_data["train"], tmp_path / "run", pause=pause_after(7),
                 extra_callbacks=(AdapterDtype(),))
    assert paused.status == "paused" and set(seen) == {torch.bfloat16}
    resumed = run(spec, demo_data["train"], tmp_path / "run", resume=True)
    assert resumed.summary["steps"] == {"completed": 30, "planned": 30, "resumed_from": 7}
    run(spec, demo_data["train"], tmp_path / "straight")

    def curve(path):
        return [(r["step"], r["train_loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    got = curve(tmp_path / "run")
    assert got == curve(tmp_path / "straight")
    assert got[-1][1] < 0.8 * got[0][1]  # and it learns
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}


def test_a_pre_quantized_base_trains_exactly_like_quantizing_afresh(tiny_model_dir, demo_data, tmp_path):
    data = short_spec(tiny_model_dir, max_steps=10)
    data["output"] = {"merge": True}  # the merge reloads the base: from the cache too
    spec = JobSpec.parse(data)
    cache = tmp_path / "quantized"
    first = run(spec, demo_data["train"], tmp_path / "first", quantized_cache=cache)
    assert first.summary["quantized_base"] == "quantized" and (cache / "config.json").exists()
    assert "quantization_config" in json.loads((cache / "config.json").read_text())
    second = run(spec, demo_data["train"], tmp_path / "second", quantized_cache=cache)
    assert second.summary["quantized_base"] == "cache"

    def curve(path):
        return [(r["step"], r["train_loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert curve(tmp_path / "first") == curve(tmp_path / "second")  # the same function, to the bit
    assert second.summary["merge_fidelity"] == first.summary["merge_fidelity"]


def test_a_dpo_run_paused_with_a_spec_stored_before_its_packing_was_refused_resumes(tmp_path):
    """Its manifest holds the spec the job was stored with ("packing": true, accepted then and silently not done
    by dpo), as the earlier release wrote it: read back with the check that came since, it could not be filled
    in with what was added since, and looked like another spec: 'cannot resume: spec differ'."""
    from worker.training.recipe import _check_run_dir, _sha256

    stored = {"base_model": "tiny", "method": {"type": "dpo"}, "training": {"max_steps": 10, "packing": True}}
    spec = JobSpec.parse(stored, stored=True)
    written = spec.model_dump(mode="json")
    del written["eval"]  # written by an earlier release, before a section added since (it takes its defaults)
    out, train = interrupted_run(tmp_path, '{"prompt": "a", "chosen": "b", "rejected": "c"}', written)
    latest, resumed, _ = _check_run_dir(out, out / "checkpoints", spec, spec, _sha256(train), None, True, None, "cpu")
    assert latest == out / "checkpoints" / "step-3" and resumed == spec


def interrupted_run(tmp_path, row: str, written_spec: dict):
    """A run directory as an interrupted run leaves it: a complete checkpoint at step 3 and run.json with
    `written_spec`, over a training file of one row; (the run directory, the training file)."""
    train = tmp_path / "train.jsonl"
    train.write_text(row + "\n")
    out = tmp_path / "run"
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    (out / "checkpoints" / "step-3" / "COMPLETE").write_text("")
    (out / "checkpoints" / "step-3" / "trainer_state.json").write_text("{}")
    (out / "run.json").write_text(json.dumps({"spec": written_spec, "train_sha256": _file_sha256(train),
                                              "validation_sha256": None, "initial_adapter_sha256": None}))
    return out, train


def _file_sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_curve(path):
    return [(r["step"], r["train_loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_a_resume_keeps_the_packing_and_compute_dtype_the_interrupted_run_decided_for_auto(
        tiny_model_dir, demo_data, tmp_path):
    """packing and compute_dtype "auto" were decided again by each attempt, from the worker it landed on: an
    attempt that packed (a worker with flash-attention) resumed on one without went on unpacked, each step then
    other rows than the checkpoint's data position counts (rows skipped and repeated), and one that computed in
    bfloat16 went on in float32 (or the reverse), unsaid. run.json records both now, and a resume keeps them where
    the device can run them. The interrupted attempt here asked for them outright, which writes the run.json an
    "auto" attempt on such a worker writes: packing true, and the compute dtype other than this CPU's own."""
    from worker.training.model import resolve_compute_dtype

    other = "float32" if resolve_compute_dtype("auto", "cpu") == torch.bfloat16 else "bfloat16"

    def spec(packing, dtype):
        # Few steps: "other" is bfloat16 on a CPU without native bf16, which emulates it (~4 s a step on one).
        data = short_spec(tiny_model_dir, max_steps=4, packing=packing)
        data["quantization"] = {**data.get("quantization", {}), "compute_dtype": dtype}
        return JobSpec.parse(data)

    paused = run(spec(True, other), demo_data["train"], tmp_path / "run", pause=pause_after(2))
    assert paused.status == "paused"
    events: list = []
    resumed = run(spec("auto", "auto"), demo_data["train"], tmp_path / "run", resume=True, sink=events.append)
    assert resumed.status == "succeeded", resumed.summary
    assert resumed.summary["steps"] == {"completed": 4, "planned": 4, "resumed_from": 2}
    assert resumed.summary["speedups"]["packing"] is True and resumed.summary["compute_dtype"] == other
    kept = [e for e in events if isinstance(e, Event) and e.type == "decisions_kept"]
    assert len(kept) == 1 and kept[0].data == {"training.packing": True, "quantization.compute_dtype": other}
    assert "the same rows in each step" in kept[0].message

    run(spec(True, other), demo_data["train"], tmp_path / "straight")
    assert _train_curve(tmp_path / "run") == _train_curve(tmp_path / "straight")  # the same run, to the bit


def test_a_decision_the_resuming_worker_cannot_run_is_replaced_and_said(tiny_model_dir, demo_data, tmp_path,
                                                                        straight_short_run):
    """A run that computed in float16 with Liger's kernels (what "auto" decides on a CUDA GPU without bfloat16,
    with liger-kernel installed) resumed on a worker that has neither: it goes on with this worker's own
    decisions, says so in a warning, and trains the same rows in the same order (here: the straight run on this
    CPU, whose checkpoint it is). Before, run.json held "auto" and the run changed unsaid."""
    spec = JobSpec.parse(short_spec(tiny_model_dir))
    paused = run(spec, demo_data["train"], tmp_path / "run", pause=pause_after(7))
    assert paused.status == "paused"
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    own = paused.summary["compute_dtype"]
    assert manifest["spec"]["quantization"]["compute_dtype"] == own  # decided, not "auto": it travels
    assert manifest["spec"]["training"]["packing"] is False and manifest["spec"]["training"]["kernels"] == "none"
    manifest["spec"]["quantization"]["compute_dtype"] = "float16"
    manifest["spec"]["training"]["kernels"] = "liger"
    (tmp_path / "run" / "run.json").write_text(json.dumps(manifest))

    events: list = []
    resumed = run(spec, demo_data["train"], tmp_path / "run", resume=True, sink=events.append)
    assert resumed.status == "succeeded", resumed.summary
    assert resumed.summary["compute_dtype"] == own and resumed.summary["speedups"]["liger"] is False
    changed = {e.data["field"]: e for e in events if isinstance(e, Event) and e.type == "decision_changed"}
    assert set(changed) == {"quantization.compute_dtype", "training.kernels"}
    assert changed["quantization.compute_dtype"].level == "warning"
    assert changed["quantization.compute_dtype"].data == {"field": "quantization.compute_dtype", "before": "float16",
                                                          "now": own}
    assert "needs a CUDA GPU" in changed["quantization.compute_dtype"].message
    written = json.loads((tmp_path / "run" / "run.json").read_text())["spec"]
    assert written["quantization"]["compute_dtype"] == own and written["training"]["kernels"] == "none"  # what runs now
    assert _train_curve(tmp_path / "run") == _train_curve(straight_short_run)


def test_a_run_json_that_left_packing_compute_dtype_and_kernels_auto_resumes_with_this_workers_decisions(tmp_path):
    """A run paused by the release before these were recorded wrote them "auto": nothing to keep, so this
    worker's decisions, and the manifest rewritten with them, rather than 'cannot resume: spec differ'."""
    from worker.training.recipe import _check_run_dir, _sha256

    spec = JobSpec.parse({"base_model": "tiny", "training": {"max_steps": 10}})
    fitted = JobSpec.parse({"base_model": "tiny", "training": {"max_steps": 10, "packing": False, "kernels": "none"},
                            "quantization": {"compute_dtype": "float32"}})
    out, train = interrupted_run(tmp_path, '{"text": "a"}', spec.model_dump(mode="json"))
    latest, resumed, unheld = _check_run_dir(out, out / "checkpoints", fitted, spec, _sha256(train), None, True, None, "cpu")
    assert latest == out / "checkpoints" / "step-3" and resumed == fitted and unheld == []
    assert json.loads((out / "run.json").read_text())["spec"] == fitted.model_dump(mode="json")


def test_a_cached_base_of_another_compute_dtype_is_passed_over_not_computed_in(tiny_model_dir, tmp_path):
    """A pre-quantized base's 4-bit layers compute in the dtype saved in its config, whatever the loading run asks:
    an entry saved by a float32 run (a CPU worker of the class, or a run that kept its first attempt's float32)
    made a bfloat16 run compute in float32, unsaid. It is now quantized afresh, and the entry left as it was."""
    import bitsandbytes as bnb

    from worker.training.model import cache_holds, load_base_model

    quant = JobSpec.parse({"base_model": "m", "training": {"max_steps": 1}}).quantization
    cache = tmp_path / "quantized"
    load_base_model(tiny_model_dir, quant, torch.float32, "cpu", quantized_cache=cache)
    saved = (cache / "config.json").read_text()
    assert cache_holds(cache, torch.float32) and not cache_holds(cache, torch.bfloat16)

    model = load_base_model(tiny_model_dir, quant, torch.bfloat16, "cpu", quantized_cache=cache)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {layer.compute_dtype for layer in layers} == {torch.bfloat16}
    assert (cache / "config.json").read_text() == saved  # the float32 runs' entry, untouched
