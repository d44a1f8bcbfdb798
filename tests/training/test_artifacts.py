"""What a team downloads, read with the standard tools outside the service, for a base shaped like Llama 3.1:
its chat template and special tokens, no pad and no unk token (a pad must come from somewhere), a spare
`<|finetune_right_pad_id|>`, and the stop tokens Meta's generation_config.json lists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors import safe_open
from transformers import AddedToken, AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.training.conftest import dataset_bytes
from worker.training import checkpoints
from worker.training.recipe import run
from worker.training.spec import JobSpec
from worker.training.tiny import build_tokenizer, demo_spec

LLAMA31 = json.loads((Path(__file__).parent / "chat_templates.json").read_text(encoding="utf-8"))["llama3.1"]
HUB_ID, REVISION = "meta-llama/Llama-3.1-8B-Instruct", "0e9e39f249a16976918f6564b8830bc894c89659"
STOPS = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]  # Llama 3.1 Instruct's generation_config.json eos_token_id


def llama31_like(out: Path) -> Path:
    """A tiny random Llama whose tokenizer is dressed as Llama 3.1's (EOS <|eot_id|>, no unk, no pad)."""
    build_tokenizer(0).save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    specials = [*LLAMA31["special"], LLAMA31["bos"], "<|finetune_right_pad_id|>"]
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    tok.eos_token, tok.bos_token, tok.chat_template = LLAMA31["eos"], LLAMA31["bos"], LLAMA31["template"]
    tok.unk_token = None
    tok.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token is None and tok.unk_token is None
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=128, intermediate_size=352,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, do_sample=False,
                                               eos_token_id=tok.convert_tokens_to_ids(STOPS))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama31_run(tmp_path_factory, demo_data):
    base = llama31_like(tmp_path_factory.mktemp("llama31"))
    spec = demo_spec(str(base))
    # The 3.1 template writes a dated system header before every conversation.
    spec["training"].update(max_steps=4, max_seq_length=256, per_device_batch_size=4, save_steps=4, eval_steps=4)
    spec["eval"] = {"prompts": 0}
    spec["base_model"] = "llama-3.1-like"  # a registered name, as the service runs it
    result = run(JobSpec.parse(spec), demo_data["train"], tmp_path_factory.mktemp("llama31-run") / "out",
                 registry={"llama-3.1-like": str(base)}, base_model_id=HUB_ID, base_model_revision=REVISION)
    assert result.status == "succeeded"
    return base, result


def test_an_adapter_for_a_base_without_pad_or_unk_loads_with_plain_peft_onto_the_base(llama31_run):
    """Llama 3 has neither a pad nor an unk token. The pad used to be a new token, a row past the base's
    embeddings: the adapter then carried the whole embedding matrix and output head, and
    `PeftModel.from_pretrained(base, "adapter")` failed with a size mismatch on both. A spare special token
    of the vocabulary pads instead, and the downloads keep the base's shape."""
    base, result = llama31_run
    adapter = result.out_dir / "adapter"
    assert result.summary["tokenizer"]["pad_token"] == "<|finetune_right_pad_id|>"
    assert not result.summary["tokenizer"]["pad_token_added"]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        assert all("lora_" in name for name in weights.keys())  # the adapter alone, no embedding copies
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)  # raised before
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.pad_token_id < model.get_input_embeddings().weight.shape[0]
    assert json.loads((result.out_dir / "merged" / "config.json").read_text())["vocab_size"] == len(tokenizer)


def test_the_merged_model_stops_where_the_base_stops(llama31_run):
    """generation_config.json's eos_token_id keeps the base's stop tokens (what vLLM and generate() stop at): it
    used to be the tokenizer's EOS alone, and the merged model ran on past <|end_of_text|> and <|eom_id|>."""
    base, result = llama31_run
    tokenizer = AutoTokenizer.from_pretrained(result.out_dir / "merged")
    merged = GenerationConfig.from_pretrained(result.out_dir / "merged")
    assert merged.eos_token_id == tokenizer.convert_tokens_to_ids(STOPS) == GenerationConfig.from_pretrained(base).eos_token_id
    assert tokenizer.eos_token_id in merged.eos_token_id and merged.pad_token_id == tokenizer.pad_token_id


def test_the_adapter_names_its_base_by_its_public_id_never_a_path_of_the_machine_that_trained_it(llama31_run):
    """adapter_config.json's base_model_name_or_path (what AutoPeftModelForCausalLM loads the base from) and the
    adapter's model card named the directory the worker loaded the base from: its model path, or its attempt's
    quantized copy. They name the registry's hub id and revision; no file of either download names a local path."""
    base, result = llama31_run
    adapter = result.out_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (HUB_ID, REVISION)
    assert f"base_model: {HUB_ID}" in (adapter / "README.md").read_text()
    for path in [*adapter.iterdir(), *(result.out_dir / "merged").iterdir()]:
        if path.suffix in (".json", ".md", ".jinja"):
            text = path.read_text()
            assert str(base) not in text and str(result.out_dir) not in text, path.name


def test_the_adapter_has_a_model_card_that_says_what_it_is_and_how_to_load_it(llama31_run):
    """adapter/README.md was peft's empty template, every field "[More Information Needed]". It is a model card of
    the run: front matter the Hub and peft read, the method and its settings, the data, how training and the merge
    went, and a loading snippet in the compute dtype it was trained in, which runs as written."""
    base, result = llama31_run
    adapter = result.out_dir / "adapter"
    card = ModelCard.load(adapter / "README.md")
    assert "More Information Needed" not in card.content
    assert card.data.base_model == HUB_ID and card.data.library_name == "peft"
    assert {"lora", "qlora", "sft", f"base_model:adapter:{HUB_ID}"} <= set(card.data.tags)
    spec, dtype = result.summary["spec"], result.summary["compute_dtype"]
    text = card.text
    assert "trained with supervised fine-tuning (SFT) on a 4-bit NF4 base (QLoRA)" in text, text
    assert f"| LoRA | r {spec['lora']['r']}, alpha {spec['lora']['alpha']:g}, dropout {spec['lora']['dropout']:g}" in text
    assert "| steps | 4 of 4 planned |" in text and f"| compute dtype | {dtype} |" in text
    train = result.summary["data"]["train"]
    assert f"| train | - | {train['rows']:,} | {train['tokens']:,} | {train['trained_tokens']:,} |" in text, text
    assert f"{result.summary['train_loss_final']:.4f} at the last" in text
    assert "- validation loss: none (no validation set)" in text and "- eval report: none (eval.prompts 0)" in text
    assert f"merge fidelity: max |logit diff| {result.summary['merge_fidelity']['max_abs_logit_diff']:.3g}" in text
    snippet = text.split("```python\n")[1].split("```")[0]
    assert f"dtype=torch.{dtype}" in snippet
    loaded: dict = {}
    exec(snippet.replace(json.dumps(HUB_ID), json.dumps(str(base))).replace("path/to/adapter", str(adapter)), loaded)  # as a reader would
    assert type(loaded["model"]).__name__ == "PeftModelForCausalLM" and loaded["base"].dtype == getattr(torch, dtype)


def test_the_downloads_tokenizer_config_holds_no_load_kwargs_of_the_machine_that_trained_it(llama31_run, tmp_path):
    """transformers 5's save_pretrained wrote how the worker loaded the tokenizer ("local_files_only": true,
    "is_local": true) into both downloads' tokenizer_config.json, and the Trainer into each checkpoint's (stored,
    and moved to whichever host resumes it). Copied to another machine, each tokenizer loads as the base's,
    offline or not, and what it writes again carries neither."""
    base, result = llama31_run
    expected = AutoTokenizer.from_pretrained(base)("hello <|eot_id|> world")["input_ids"]
    checkpoint = checkpoints.latest_complete(result.out_dir / "checkpoints")
    assert checkpoint is not None and (checkpoint / "tokenizer_config.json").is_file()
    for name in ("adapter", "merged", f"checkpoints/{checkpoint.name}"):
        config = json.loads((result.out_dir / name / "tokenizer_config.json").read_text())
        assert not {"local_files_only", "is_local"} & config.keys(), name
        copied = shutil.copytree(result.out_dir / name, tmp_path / name)
        for offline in (False, True):
            assert AutoTokenizer.from_pretrained(copied, local_files_only=offline)("hello <|eot_id|> world")[
                "input_ids"] == expected, (name, offline)


def short_spec(base_model: str, steps: int = 2, **sections) -> JobSpec:
    spec = demo_spec(base_model)
    spec["training"].update(max_steps=steps, per_device_batch_size=4, save_steps=2, eval_steps=2)
    spec["eval"] = {"prompts": 0}
    return JobSpec.parse({**spec, **sections})


def test_a_merge_the_host_cannot_hold_is_not_started_and_the_adapter_is_delivered(tiny_model_dir, demo_data, tmp_path):
    """A merge on the CPU takes about twice the merged model in host memory (a 65B model in bfloat16: 260 GB);
    streamed from the 4-bit base, a file being written and a layer, beside the 4-bit base on a CPU worker. With
    less than either, the kernel killed the training process after the whole training, and every attempt after it
    again, and the job failed with nothing to download. It succeeds now with the adapter, the summary and a
    warning event saying why there is no merged model, and the eval report answers with the adapter."""
    events: list = []
    spec = short_spec("tiny", eval={"prompts": 2, "max_new_tokens": 4})
    # Host memory for its dataset alone (the run holds it from start to end), none to merge in.
    result = run(spec, demo_data["train"], tmp_path / "out", registry={"tiny": str(tiny_model_dir)},
                 sink=events.append, host_memory=dataset_bytes(demo_data["train"]))
    assert result.status == "succeeded" and spec.output.merge
    assert (result.out_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (result.out_dir / "merged").exists() and result.summary["merge_fidelity"] is None
    skipped = [e for e in events if getattr(e, "type", None) == "merge_skipped"]
    assert len(skipped) == 1 and skipped[0].level == "warning" and skipped[0].message == result.summary["merge_skipped"]
    assert "GiB of host memory" in skipped[0].message and "0.0 GiB available" in skipped[0].message
    assert "writing it layer by layer takes about" in skipped[0].message  # the streaming merge did not fit either
    assert result.report["generation"]["tuned"].startswith("the adapter on the base model")
    from app.cli.render import summary_rows  # what `qlora jobs show` shows of the summary

    assert dict(summary_rows(result.summary))["merged model"] == result.summary["merge_skipped"]


def test_a_merge_too_large_to_build_in_memory_is_streamed_from_the_quantized_base(tiny_model_dir, demo_data, tmp_path):
    """Where the host cannot hold the merged model built whole, but can hold the 4-bit base, a file being written
    and a layer (the QLoRA paper's 65B on a 48 GiB GPU and a 128 GB host), the merged model is written tensor by
    tensor from the 4-bit base, where it used to be skipped: the same files the in-memory merge writes, its
    fidelity measured from them with the layers that do not fit read from disk, and the eval report on the
    adapter (the merged model cannot be loaded whole)."""
    from worker.training.merge import stop_token_ids, write_merged

    events: list = []
    dense = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors")) // 2  # float32 → bfloat16
    spec = short_spec("tiny", eval={"prompts": 1, "max_new_tokens": 2})
    # 1.5x the merged model: less than the in-memory merge's 2x, more than a 256 kB file, a layer and the 4-bit base.
    result = run(spec, demo_data["train"], tmp_path / "out", registry={"tiny": str(tiny_model_dir)},
                 sink=events.append, host_memory=int(1.5 * dense), merge_shard_size="256KB")
    assert result.status == "succeeded" and result.summary["merge_skipped"] is None
    streamed = [e for e in events if getattr(e, "type", None) == "merging_streamed"]
    assert len(streamed) == 1 and "layer by layer on the CPU" in streamed[0].message
    merged_events = [e for e in events if getattr(e, "type", None) == "merged"]
    assert len(merged_events) == 1 and merged_events[0].data["merge"] == "streaming"
    fidelity = result.summary["merge_fidelity"]
    assert fidelity["merge"] == "streaming" and fidelity["eval_loss_diff"] < 0.01 and fidelity["max_abs_logit_diff"] < 0.5
    assert fidelity["modules_read_from_disk"] > 0  # measured without loading the merged model whole
    merged = result.out_dir / "merged"
    assert len(list(merged.glob("model-*.safetensors"))) > 1 and (merged / "tokenizer.json").is_file()
    # What the in-memory merge writes from the same adapter, configured as the recipe configures it.
    tokenizer = AutoTokenizer.from_pretrained(result.out_dir / "adapter")

    def configure(model):
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = stop_token_ids(model.generation_config.eos_token_id, tokenizer)

    write_merged("in_memory", tmp_path / "in_memory", base_path=tiny_model_dir, adapter_dir=result.out_dir / "adapter",
                 quant=spec.quantization, compute_dtype=getattr(torch, result.summary["compute_dtype"]),
                 merge_dtype=torch.bfloat16, device="cpu", tokenizer=tokenizer, max_shard_size="256KB",
                 configure=configure)
    for path in (tmp_path / "in_memory").iterdir():
        assert path.read_bytes() == (merged / path.name).read_bytes(), path.name
    assert result.report["generation"]["tuned"].startswith("the adapter on the base model")
    from app.cli.render import summary_rows

    assert dict(summary_rows(result.summary))["merge fidelity"].endswith("; merged layer by layer")


def grown_adapter(tiny_model_dir, demo_data, tmp_path):
    """A copy of the tiny base whose tokenizer has nothing to pad with, and an adapter trained on it (a pad row added)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.unk_token = tokenizer.eos_token  # nothing to reuse: a pad must be added
    tokenizer.save_pretrained(base)
    result = run(short_spec("tiny", output={"merge": False}), demo_data["train"], tmp_path / "sft",
                 registry={"tiny": str(base)})
    assert result.summary["tokenizer"]["pad_token_added"]
    return base, result


def test_where_a_pad_is_added_the_adapter_carries_the_grown_embeddings(tiny_model_dir, demo_data, tmp_path):
    """A tokenizer with nothing to pad with gets a pad token, and the model a row for it: the adapter then carries
    the grown embeddings and head, loading onto the base once resized to the adapter's tokenizer. (peft decides
    that by reading the config.json at the path the adapter names its base by, a registered name now.)"""
    base, result = grown_adapter(tiny_model_dir, demo_data, tmp_path)
    adapter = result.out_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(weights.keys())
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter)))
    PeftModel.from_pretrained(model, adapter)


def test_the_downloads_pad_on_the_side_the_base_pads(tiny_model_dir, demo_data, tmp_path):
    """Training pads on the right; a base whose tokenizer pads on the left (Phi-3's) used to ship a tokenizer padding
    on the right, and batched generate() then continued each shorter prompt after its padding."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    AutoTokenizer.from_pretrained(base, padding_side="left").save_pretrained(base)
    spec = demo_spec(str(base))
    spec["training"].update(max_steps=2, per_device_batch_size=4, save_steps=2, eval_steps=2)
    spec["eval"] = {"prompts": 0}
    result = run(JobSpec.parse(spec), demo_data["train"], tmp_path / "out")
    assert AutoTokenizer.from_pretrained(result.out_dir / "adapter").padding_side == "left"
    tokenizer = AutoTokenizer.from_pretrained(result.out_dir / "merged")
    assert tokenizer.padding_side == "left"
    model = AutoModelForCausalLM.from_pretrained(result.out_dir / "merged")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in ("What does the cow say?", "Hey, Ben here. What does the lion say? Please answer the question")]
    alone = [model.generate(**tokenizer(p, return_tensors="pt", add_special_tokens=False), max_new_tokens=6,
                            min_new_tokens=6)[0, -6:]
             for p in prompts]
    batch = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False),
                           max_new_tokens=6, min_new_tokens=6)[:, -6:]  # six each: none stops early
    assert [row.tolist() for row in batch] == [row.tolist() for row in alone]


@pytest.mark.parametrize("merge", [True, False])
def test_a_job_continues_an_adapter_that_carries_more_rows_than_it_adds(tiny_model_dir, demo_data, tmp_path, merge):
    """An SFT adapter trained where a pad row was added (an adapter of Llama 3 from before spare pad tokens), continued
    by DPO whose tokenizer pads with a token it has: peft refused the adapter's larger matrices at the start, and the
    merge and the report (on the adapter, without a merge) would have too. The continued adapter and the merged model
    keep the rows the started adapter carries."""
    from worker.training.tiny import demo_pairs, write_jsonl

    base, sft = grown_adapter(tiny_model_dir, demo_data, tmp_path)
    rows = json.loads((base / "config.json").read_text())["vocab_size"]
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base)  # unk pads again: no row added
    pairs = write_jsonl(demo_pairs(0, 16), tmp_path / "pairs.jsonl")
    spec = short_spec("tiny", method={"type": "dpo"}, output={"merge": merge},
                      eval={"prompts": 0 if merge else 1, "max_new_tokens": 2})
    result = run(spec, pairs, tmp_path / "dpo", registry={"tiny": str(base)}, initial_adapter=sft.out_dir / "adapter")
    assert result.status == "succeeded" and not result.summary["tokenizer"]["pad_token_added"]
    with safe_open(str(result.out_dir / "adapter" / "adapter_model.safetensors"), "pt") as weights:
        assert weights.get_slice("base_model.model.model.embed_tokens.weight").get_shape()[0] == rows + 1
    if merge:
        assert json.loads((result.out_dir / "merged" / "config.json").read_text())["vocab_size"] == rows + 1
        assert result.summary["merge_fidelity"]["eval_loss_diff"] < 0.01
    else:
        assert result.report is not None


def test_an_attempt_that_adds_no_pad_row_resumes_a_checkpoint_that_has_one(tiny_model_dir, demo_data, tmp_path):
    """A job paused (or its worker lost) where a pad row was added, resumed where none is (Llama 3, across the release
    that pads with a spare token): loading its checkpoint failed on the larger matrices, and the job with it."""
    import shutil

    from transformers import TrainerCallback

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.unk_token = tokenizer.eos_token  # nothing to reuse: a pad must be added
    tokenizer.save_pretrained(base)
    spec = short_spec("tiny", steps=4)
    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    out = tmp_path / "out"
    paused = run(spec, demo_data["train"], out, registry={"tiny": str(base)}, pause=lambda: bool(steps),
                 extra_callbacks=(Steps(),))
    assert paused.status == "paused" and paused.summary["tokenizer"]["pad_token_added"]
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base)  # unk pads again: no row added
    resumed = run(spec, demo_data["train"], out, registry={"tiny": str(base)}, resume=True)
    assert resumed.status == "succeeded" and resumed.summary["steps"]["resumed_from"] > 0
    rows = json.loads((base / "config.json").read_text())["vocab_size"]
    assert json.loads((out / "merged" / "config.json").read_text())["vocab_size"] == rows + 1
