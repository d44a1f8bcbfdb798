"""Model families other than Llama through the real engine: one whose attention has no SDPA path trains
and merges faithfully; one bitsandbytes would leave in 16 bits is refused before it trains; embeddings
with spare rows, or a tokenizer whose pad lies past them, keep the merged model the base's shape."""

import json

import pytest
from transformers import AutoTokenizer

from worker.training.recipe import run
from worker.training.spec import JobSpec, SpecError
from worker.training.tiny import build_tiny_model, demo_spec


def short_spec(model_dir, steps: int = 12) -> JobSpec:
    data = demo_spec(str(model_dir))
    data["training"].update(max_steps=steps, logging_steps=4, eval_steps=steps, save_steps=steps)
    data["eval"] = {"prompts": 0}
    return JobSpec.parse(data)


def test_gemma2_trains_with_eager_attention_and_merges_faithfully(tmp_path, demo_data):
    """Gemma 2 soft-caps its attention scores, which SDPA cannot do, and transformers refuses to load it
    with SDPA: the engine gives it eager attention (the summary says so) instead of failing the job."""
    model = build_tiny_model(tmp_path / "gemma2", model_type="gemma2", head_dim=64)
    result = run(short_spec(model), demo_data["train"], tmp_path / "out", validation_path=demo_data["validation"])
    assert result.status == "succeeded"
    s = result.summary
    assert s["speedups"]["attention"] == "eager"
    assert s["steps"]["completed"] == 12
    assert s["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    f = s["merge_fidelity"]
    assert f["eval_loss_diff"] < 0.01 and f["mean_abs_logit_diff"] < 0.01, f


def test_a_mixture_of_experts_is_refused_before_it_trains(tmp_path, demo_data):
    """Mixtral's experts are 3-D weights that bitsandbytes leaves unquantized: the job fails at once,
    naming base_model, rather than train in 16 bits on memory its estimate never counted."""
    model = build_tiny_model(tmp_path / "mixtral", model_type="mixtral", num_local_experts=4)
    with pytest.raises(SpecError) as refused:
        run(short_spec(model), demo_data["train"], tmp_path / "out")
    assert refused.value.errors[0][0] == "base_model"
    message = refused.value.errors[0][1]
    assert "unquantized (model.layers.0.mlp.experts.gate_up_proj, model.layers.1.mlp.experts.gate_up_proj and " in message
    assert "MixtralForCausalLM keeps them outside torch linear layers" in message
    assert not list((tmp_path / "out").glob("checkpoints/step-*"))  # refused before a step


def merged_rows(out) -> int:
    return json.loads((out / "merged" / "config.json").read_text())["vocab_size"]


def test_spare_embedding_rows_are_kept_in_the_merged_model(tmp_path, demo_data):
    """Qwen's and Gemma 3's embeddings have rows past their tokenizers' last id: the merged model keeps
    them (it used to be cut to the tokenizer's size, a different shape from the base it came from)."""
    model = build_tiny_model(tmp_path / "spare", spare_embedding_rows=13)
    rows = json.loads((model / "config.json").read_text())["vocab_size"]
    spec = short_spec(model).model_dump(mode="json")
    spec["eval"] = {"prompts": 2, "max_new_tokens": 4}  # the report loads the base too
    result = run(JobSpec.parse(spec), demo_data["train"], tmp_path / "out", validation_path=demo_data["validation"])
    assert result.status == "succeeded"
    assert merged_rows(result.out_dir) == rows == len(AutoTokenizer.from_pretrained(model)) + 13
    assert result.summary["merge_fidelity"]["eval_loss_diff"] < 0.01


def test_a_pad_token_past_the_embeddings_gets_a_row_and_any_other_token_is_refused(tmp_path, demo_data):
    model = build_tiny_model(tmp_path / "padded")
    rows = json.loads((model / "config.json").read_text())["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # as a Qwen 2 tokenizer brings its own pad
    tokenizer.save_pretrained(model)
    result = run(short_spec(model, steps=4), demo_data["train"], tmp_path / "out")
    assert result.status == "succeeded" and result.summary["tokenizer"]["pad_token"] == "<pad>"
    assert merged_rows(result.out_dir) == rows + 1

    tokenizer.add_tokens(["<extra>"])  # a token the model has never had a row for: not its tokenizer
    tokenizer.save_pretrained(model)
    with pytest.raises(SpecError) as refused:
        run(short_spec(model, steps=4), demo_data["train"], tmp_path / "again")
    assert refused.value.errors[0][0] == "base_model"
    assert f"has {rows + 2} tokens and its embeddings {rows} rows: '<extra>' would index past them" in str(refused.value)


def test_a_two_matrix_mlp_tiles_to_the_same_curve(tmp_path, demo_data):
    """GPT-NeoX's MLP (two matrices, no gate; its layers also run attention and MLP in parallel):
    training.tiled_mlp tiles it, where it used to fail every such job that "auto" turned tiling on for,
    and in float32 the curve is the untiled one's to float tolerance."""
    model = build_tiny_model(tmp_path / "neox", model_type="gpt_neox")
    curves = {}
    for tiled in (False, True):
        data = short_spec(model, steps=4).model_dump(mode="json")
        data["training"].update(tiled_mlp=tiled, activation_offload=False, per_device_batch_size=16, logging_steps=1)
        data["lora"]["dropout"], data["quantization"]["compute_dtype"] = 0.0, "float32"
        data["output"] = {"merge": False}
        result = run(JobSpec.parse(data), demo_data["train"], tmp_path / f"out-{tiled}")
        assert result.summary["spec"]["training"]["tiled_mlp"] is tiled
        assert result.summary["target_modules"] == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
        curves[tiled] = [r["train_loss"] for r in map(json.loads, (result.out_dir / "metrics.jsonl").read_text().splitlines())
                         if r["kind"] == "train"]
    assert curves[True] == pytest.approx(curves[False], rel=1e-5) and len(curves[True]) == 4
