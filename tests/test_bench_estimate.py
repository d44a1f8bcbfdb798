"""bench/estimate_bench.py runs end to end on the CPU (a benchmark: its accuracy target is measured on GPUs)."""

import json

import pytest

from bench import estimate_bench, train_bench

OFFLOADED = "tiny:2:64:offload:tiled"


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory):
    """A work folder holding the tiny preset's 16-bit model (seed 0), built once for the module, in this process:
    estimate_bench's runs find it where ensure_model keeps it (ensure_model's own build, in a process of its own,
    is what test_bench_train runs), and the 4-bit layout test quantizes it as the engine would."""
    work = tmp_path_factory.mktemp("estimate-work")
    dims = train_bench.PRESETS["tiny"]
    train_bench.build_model(work / train_bench.model_name(dims, 0) / "model", dims, seed=0)
    return work


@pytest.fixture(scope="module")
def cpu_run(tiny_work):
    """One run of the CPU cases the tests below read: each case is a process of its own (most of its time is
    imports), so one run serves them all. Returns the report and the JSON file it saved."""
    out = tiny_work / "estimate_bench.json"
    report = estimate_bench.main(["--case", "tiny:2:64", "--case", "tiny:2:64:nogc", "--case", OFFLOADED,
                                  "--work", str(tiny_work), "--out", str(out)])
    return report, out


def test_estimate_bench_sets_predicted_beside_measured(cpu_run, tiny_work):
    report, out = cpu_run
    assert json.loads(out.read_text())["rows"] == report["rows"]
    on, off, _ = report["rows"]
    assert (on["micro_batch"], on["seq"], on["gradient_checkpointing"]) == (2, 64, True)
    assert off["gradient_checkpointing"] is False
    for row in (on, off):
        assert row["predicted_bytes"] > 0 and row["measured_bytes"] > 0
        assert row["error"] == row["predicted_bytes"] / row["measured_bytes"] - 1
    assert off["predicted_bytes"] > on["predicted_bytes"]  # activations of every layer, not one
    # The later cases loaded the base the first one quantized.
    assert len(list(tiny_work.glob("llama-*/estimate/quantized/config.json"))) == 1


def test_cases_carry_the_memory_savers_and_the_lora_knobs():
    case = estimate_bench.Case.parse("8b-long:1:32768:tiled:offload")
    assert (case.preset, case.batch, case.seq, case.checkpointing, case.offload, case.tiled) == (
        "8b-long", 1, 32768, True, True, True)
    assert case.name == "8b-long:1:32768:offload:tiled" and estimate_bench.Case.parse(case.name) == case
    paper = estimate_bench.Case.parse("65b:1:512:paper")
    assert (paper.r, paper.alpha) == (64, 16) and paper.name == "65b:1:512:r64:alpha16"
    assert estimate_bench.Case.parse("tiny:2:64:nogc:r8").file_stem == "b2-s64-nogc-r8"
    assert estimate_bench.Case.parse("tiny:2:64").file_stem == "b2-s64-gc"  # the names runs have always had
    standard = estimate_bench.Case.parse("8b-long:1:16384:standard")
    assert standard.standard and standard.name == "8b-long:1:16384:standard" and standard.file_stem == "b1-s16384-gc-standard"
    for bad, why in (("tiny:2:64:nogc:offload", "cannot go with nogc"), ("tiny:2:64:fast", "unknown option 'fast'"),
                     ("tiny:2", "expected PRESET:BATCH:SEQ"), ("70b:1:512", "no preset '70b'"),
                     ("tiny:2:64:standard:tiled", "standard recipe is fixed"),
                     ("65b:1:512:paper:standard", "standard recipe is fixed")):
        with pytest.raises(ValueError, match=why):
            estimate_bench.Case.parse(bad)
    # The default CUDA cases hold the paper's recipes and the long-context sweep, each group its own gpu.sh call.
    names = {c.name for c in estimate_bench.CASES["cuda"]}
    assert {"33b:1:512:r64:alpha16", "65b:1:512:r64:alpha16", "8b-long:1:16384", "8b-long:1:16384:offload",
            "8b-long:1:16384:tiled", "8b-long:1:16384:offload:tiled", "8b-long:1:32768:offload:tiled",
            "8b-long:1:32768", "8b-long:1:16384:standard"} <= names
    # A call cut off by the device's time limit keeps the rows the targets need: they come first.
    assert [c.name for c in estimate_bench.GROUPS["memory"][:4]] == [
        "8b-long:1:16384:standard", "8b-long:1:16384", "8b-long:1:16384:offload:tiled", "8b-long:1:32768:offload:tiled"]


def test_a_case_with_offload_and_tiling_trains_and_its_row_says_so(cpu_run, tiny_work):
    report, _ = cpu_run
    row = report["rows"][-1]
    assert row["case"] == OFFLOADED
    assert (row["gradient_checkpointing"], row["activation_offload"], row["tiled_mlp"]) == (True, True, True)
    assert (row["lora_r"], row["lora_alpha"]) == (16, 32)
    assert row["predicted_bytes"] > 0 and row["measured_bytes"] > 0 and row["oom"] is None
    assert row["tokens_per_s"] > 0 and row["predicted_host_bytes"] >= 0
    assert "skipped" in report["allowance_fit"]  # the CPU measures RSS: nothing to fit the GPU allowance to
    # What the engine ran: the spec the child wrote into its run directory.
    (run,) = tiny_work.glob("llama-*/estimate/b2-s64-gc-offload-tiled-run/run.json")
    training = json.loads(run.read_text())["spec"]["training"]
    assert (training["activation_offload"], training["tiled_mlp"]) == (True, True)


def test_the_layer_by_layer_4bit_base_is_what_the_engine_caches_and_it_trains(tmp_path, monkeypatch, tiny_work):
    import bitsandbytes as bnb
    from safetensors import safe_open

    from worker.training.model import load_base_model, resolve_compute_dtype
    from worker.training.spec import QuantizationSpec

    dims, work = train_bench.PRESETS["tiny"], tmp_path / "work"
    built = work / train_bench.model_name(dims, 0, quantized=True) / "model"
    train_bench.build_quantized_model(built, dims, seed=0)
    # The engine's own cache of the same shape: a 16-bit model quantized on load and saved.
    dtype = resolve_compute_dtype("auto", "cpu")
    reference = tmp_path / "reference-cache"
    load_base_model(tiny_work / train_bench.model_name(dims, 0) / "model", QuantizationSpec(), dtype, "cpu",
                    quantized_cache=reference)

    def layout(folder):
        tensors, states = {}, {}
        for file in folder.glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    if ".quant_state." in key:  # bitsandbytes' packed JSON: its length depends on the values
                        states[key] = sorted(json.loads(bytes(f.get_tensor(key).tolist())))
                    else:
                        tensors[key] = (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape()))
        return tensors, states

    config = json.loads((built / "config.json").read_text())
    assert config["quantization_config"] == json.loads((reference / "config.json").read_text())["quantization_config"]
    assert layout(built) == layout(reference)
    assert (built / "tokenizer.json").is_file()

    model = load_base_model(built, QuantizationSpec(), dtype, "cpu", quantized_cache=built)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * dims["num_hidden_layers"] and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    state = quantized[0].weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)
    weight = bnb.functional.dequantize_4bit(quantized[0].weight.data, state).float()
    assert weight.std().item() == pytest.approx(0.02, rel=0.1)  # Llama's initialisation, through NF4
    del model

    # estimate_bench on a preset built this way: the engine loads it as its own cache, and trains.
    # So does the standard recipe (train_bench's baseline), which loads it as any 4-bit checkpoint.
    monkeypatch.setattr(train_bench, "PREQUANTIZED", {"tiny"})
    report = estimate_bench.main(["--case", "tiny:2:64:r8", "--case", "tiny:2:64:r8:standard", "--work", str(work),
                                  "--out", str(tmp_path / "out.json")])
    row, standard = report["rows"]
    assert row["measured_bytes"] > 0 and row["tokens_per_s"] > 0 and row["lora_r"] == 8
    raw = json.loads((built.parent / "estimate" / "b2-s64-gc-r8.json").read_text())
    assert raw["quantized_base"] == "cache" and len(raw["steps"]) == estimate_bench.STEPS
    assert all(step["loss"] > 0 for step in raw["steps"])
    assert not (built.parent / "estimate" / "quantized").exists()  # nothing quantized again
    assert standard["standard_recipe"] and standard["measured_bytes"] > 0 and standard["tokens_per_s"] > 0
    assert (standard["predicted_bytes"], standard["error"]) == (None, None)  # the estimate is the engine's
    assert row["peak_vs_standard"] == row["measured_bytes"] / standard["measured_bytes"]
    raw_standard = json.loads((built.parent / "estimate" / "b2-s64-gc-r8-standard.json").read_text())
    assert raw_standard["speedups"]["liger"] is False and len(raw_standard["steps"]) == estimate_bench.STEPS
    # The same weights and the same first batch: the two recipes start from the same loss.
    assert raw_standard["steps"][0]["loss"] == pytest.approx(raw["steps"][0]["loss"], rel=1e-3)


def test_on_cuda_an_oom_is_a_row_and_the_allowance_is_fitted_from_the_rest(tmp_path, monkeypatch):
    """The CUDA report's logic without a GPU: the engine's runs stand in, measuring what a known
    allowance would (0.5 GiB + 10 % of the resident parts), and one runs out of memory."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(train_bench.PRESETS["8b-long"]))
    monkeypatch.setattr(estimate_bench, "ensure_model", lambda work, dims, seed, quantized=False: model)
    gib = 2**30

    def run_child(path, model_dir, data, settings, out):
        if path == "baseline":  # the standard recipe at 16k: 30 GiB, far from any estimate of the engine's
            return {"steps": [{"t": t, "tokens": t * settings["seq"]} for t in range(4)], "speedups": {},
                    "memory": {"reserved": 30 * gib, "allocated": 1}}
        if settings["seq"] == 32768 and not settings["tiled_mlp"]:
            return {"oom": "out of memory on H200 at step 1 ...", "steps": [], "memory": {"reserved": 70 * gib}}
        e = estimate_bench.estimator.estimate_peak_memory(train_bench.engine_spec(str(model_dir), settings),
                                                          train_bench.PRESETS["8b-long"])
        allocated = e.resident - e.parts["allowance (context, fragmentation)"]
        steps = [{"t": t, "tokens": t * settings["seq"]} for t in range(4)]
        return {"steps": steps, "speedups": {}, "memory": {"reserved": int(0.5 * gib + 1.1 * allocated), "allocated": 1},
                "cuda_context_bytes": int(0.4 * gib), "outside_allocator_bytes": int(0.45 * gib),
                "pinned_peak_bytes": 0}

    monkeypatch.setattr(estimate_bench, "run_child", run_child)
    report = estimate_bench.main(["--device", "cuda", "--case", "8b-long:1:16384", "--case", "8b-long:1:16384:tiled",
                                  "--case", "8b-long:1:32768", "--case", "8b-long:1:32768:offload:tiled",
                                  "--case", "8b-long:1:16384:standard",
                                  "--work", str(tmp_path), "--out", str(tmp_path / "out.json")])
    oom = report["rows"][2]
    assert (oom["measured_bytes"], oom["error"], oom["oom"]) == ("OOM", None, "out of memory on H200 at step 1 ...")
    assert report["out_of_memory"] == ["8b-long:1:32768"]
    assert all(isinstance(r["error"], float) for i, r in enumerate(report["rows"][:4]) if i != 2)
    # The standard recipe's row is a reference: no error of the estimate, outside the target and the fit.
    standard = report["rows"][4]
    assert (standard["measured_bytes"], standard["error"]) == (30 * gib, None)
    assert [r["peak_vs_standard"] for r in report["rows"]] == [
        r["measured_bytes"] / (30 * gib) if r["seq"] == 16384 and not r["standard_recipe"] else None
        for r in report["rows"]]
    fit = report["allowance_fit"]
    assert fit["rows"] == 3 and fit["fragmentation"] == pytest.approx(0.1, abs=1e-6)
    assert fit["covering_context_bytes"] == pytest.approx(0.5 * gib, abs=16)
    assert fit["suggested"]["CONTEXT_BYTES"] == pytest.approx(0.95 * gib, abs=16)  # and the context outside the allocator
    assert report["rows"][1]["tokens_per_s_vs_plain"] == 1.0  # the stand-in runs all take one second a step
    # The same fit from the saved report.
    assert estimate_bench.main(["--fit", str(tmp_path / "out.json")]) == fit
