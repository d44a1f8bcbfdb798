"""Padding-free packing: several examples in one row, and the model sees each as if it were alone."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tests.training.test_recipe import short_spec
from worker.training.data import read_jsonl
from worker.training.recipe import run
from worker.training.spec import JobSpec
from worker.training.tokenization import encode_examples, prepare_tokenizer


def test_packed_rows_give_each_example_the_loss_it_has_alone(tiny_model_dir, demo_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepare_tokenizer(tokenizer)
    rows, _ = encode_examples(read_jsonl(demo_data["validation"]).examples[:6], tokenizer, max_seq_length=64,
                              train_on_inputs=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # as in training (recipe.py): a cache would hide the packing
    model.eval()

    def summed_loss(batch) -> tuple[float, int]:
        labels = batch["labels"]
        counted = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(**{k: v for k, v in batch.items() if k != "cu_seq_lens"}).loss
        return float(loss) * counted, counted

    alone = [summed_loss({"input_ids": torch.tensor([r["input_ids"]]), "labels": torch.tensor([r["labels"]])})
             for r in rows]
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    packed_batch = collator(rows)
    assert packed_batch["input_ids"].shape[0] == 1  # one row holding all six examples
    assert "attention_mask" not in packed_batch
    packed, counted = summed_loss(packed_batch)
    assert counted == sum(n for _, n in alone)  # the same tokens are learned
    assert abs(packed - sum(s for s, _ in alone)) / packed < 1e-4  # and each sees only itself

    # Without restarting positions the examples would attend to each other: a different loss.
    crossing, _ = summed_loss({"input_ids": packed_batch["input_ids"], "labels": packed_batch["labels"]})
    assert abs(crossing - packed) / packed > 1e-3


def test_a_packed_run_trains_and_evaluates_unpacked(tiny_model_dir, demo_data, tmp_path):
    data = short_spec(tiny_model_dir, max_steps=20, eval_steps=20)
    data["training"]["packing"] = True
    result = run(JobSpec.parse(data), demo_data["train"], tmp_path, validation_path=demo_data["validation"])
    s = result.summary
    assert s["speedups"]["packing"] is True and s["speedups"]["attention"] == "sdpa"
    assert s["steps"]["completed"] == 20
    assert s["train_loss_final"] < 0.7 * s["train_loss_first"]
    assert s["eval_loss_final"] < s["train_loss_first"]
