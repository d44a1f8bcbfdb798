"""The encoded rows the recipe trains on are stored compactly (worker/training/rows.py), and the trainer sees the
same rows, labels, packing and order as from the Python lists `Dataset.from_list` was given before.

Held as Python lists, a run's encoded rows took ~49 bytes of host memory a token for the whole run (the process was
killed on the host at a billion tokens); bench/rows_bench.py measures what they take now."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
import torch
from datasets import Dataset

from tests.training.test_recipe import short_spec
from worker.training.recipe import QLoRARecipe
from worker.training.spec import JobSpec
from worker.training.tiny import demo_pairs, demo_rows, write_jsonl
from worker.training.tokenization import encode_examples, encode_preferences


def as_format(rows: list[dict], format: str) -> list[dict]:
    """demo_rows' conversations in another of the SFT formats."""
    if format == "chat":
        return rows
    pairs = [(row["messages"][0]["content"], row["messages"][1]["content"]) for row in rows]
    if format == "prompt_completion":
        return [{"prompt": prompt, "completion": answer} for prompt, answer in pairs]
    return [{"text": f"{prompt} {answer}"} for prompt, answer in pairs]  # text


def set_up(tmp_path, model_dir, format: str, *, packing: bool = False, train_rows: int = 40) -> QLoRARecipe:
    if format == "preference":
        train, validation = demo_pairs(1, train_rows), demo_pairs(2, 6, split="heldout")
    else:
        train, validation = (as_format(demo_rows(1, train_rows), format),
                             as_format(demo_rows(2, 6, split="heldout"), format))
    spec = short_spec(model_dir, max_steps=2, per_device_batch_size=4, packing=packing, group_by_length=True)
    if format == "preference":
        spec["method"] = {"type": "dpo"}
        spec["training"]["packing"] = False  # method dpo never packs
    recipe = QLoRARecipe(JobSpec.parse(spec), write_jsonl(train, tmp_path / "train.jsonl"), tmp_path / "out",
                         validation_path=write_jsonl(validation, tmp_path / "validation.jsonl"))
    recipe.setup()
    return recipe


def from_lists(recipe: QLoRARecipe, examples, dataset_name: str) -> Dataset:
    """What the recipe gave the trainer before: encode_examples' (encode_preferences') Python lists through
    Dataset.from_list, then prepared by the trainer as it prepares what it is given."""
    t = recipe.spec.training
    if recipe.spec.method.type == "dpo":
        rows, _ = encode_preferences(examples, recipe.tokenizer, max_seq_length=t.max_seq_length)
        return Dataset.from_list(rows)  # GuardedDPOTrainer prepares nothing
    rows, _ = encode_examples(examples, recipe.tokenizer, max_seq_length=t.max_seq_length,
                              train_on_inputs=t.train_on_inputs)
    packing = t.packing if dataset_name == "train" else False  # eval_packing=False
    return recipe.trainer._prepare_dataset(Dataset.from_list(rows), recipe.tokenizer, recipe.trainer.args, packing,
                                           None, dataset_name)


def epoch_batches(trainer, dataset: Dataset) -> list[dict]:
    """The batches of an epoch as the trainer's dataloader gives them to the model, in its seeded order."""
    trainer.train_dataset = dataset
    return [dict(batch) for batch in trainer.get_train_dataloader()]


def assert_same_batches(batches: list[dict], expected: list[dict]) -> None:
    assert len(batches) == len(expected)
    for batch, reference in zip(batches, expected, strict=True):
        assert batch.keys() == reference.keys()
        for key, value in reference.items():
            if isinstance(value, torch.Tensor):  # ids, labels, position ids, cu_seq_lens; a packed batch's max_length
                assert batch[key].dtype == value.dtype, key
                assert torch.equal(batch[key], value), key
            else:
                assert batch[key] == value, key


@pytest.mark.parametrize(("format", "packing"), [
    ("chat", False), ("chat", True), ("prompt_completion", False), ("text", True), ("preference", False),
])
def test_the_trainer_sees_the_same_rows_labels_packing_and_order_as_from_python_lists(
        tiny_model_dir, tmp_path, format, packing):
    recipe = set_up(tmp_path, tiny_model_dir, format, packing=packing)
    trainer = recipe.trainer
    assert recipe.spec.training.packing is packing
    for name, examples, dataset in (("train", recipe.train_data.examples, trainer.train_dataset),
                                    ("eval", recipe.val_data.examples, trainer.eval_dataset)):
        expected = from_lists(recipe, examples, name)
        assert dataset.column_names == expected.column_names
        assert dataset.to_list() == expected.to_list(), name  # the same rows and values, in the same order
    # ...and the same batches, tensors of the same dtype, in the same order under the data seed.
    compact, lists = trainer.train_dataset, from_lists(recipe, recipe.train_data.examples, "train")
    assert_same_batches(epoch_batches(trainer, compact), epoch_batches(trainer, lists))
    # Unpacked, the trainer takes the recipe's rows as they are (skip_prepare_dataset): trl's preparation copied them
    # (~8 bytes a token, bench/rows_bench.py) and changed nothing, as the batches of an epoch show, against what it
    # made of these same rows before; packed, it packs them.
    assert (compact is recipe.train_rows) is not packing
    assert (trainer.eval_dataset is recipe.val_rows) is not packing  # the flag is the trainer's: eval rows too
    if format != "preference":
        before = recipe.trainer._prepare_dataset(recipe.train_rows, recipe.tokenizer, trainer.args, packing, None,
                                                 "train")
        assert_same_batches(epoch_batches(trainer, compact), epoch_batches(trainer, before))
        evaluated = recipe.trainer._prepare_dataset(recipe.val_rows, recipe.tokenizer, trainer.args, False, None, "eval")
        assert_same_batches(eval_batches(trainer, trainer.eval_dataset), eval_batches(trainer, evaluated))


def eval_batches(trainer, dataset: Dataset) -> list[dict]:
    """The batches of an evaluation, as the trainer's eval dataloader gives them to the model."""
    return [dict(batch) for batch in trainer.get_eval_dataloader(dataset)]


def test_encoded_rows_are_not_held_as_python_objects(tiny_model_dir, tmp_path):
    """Python lists of ints took ~49 bytes a token (8 a pointer, 28 an int beyond the small ones cached, the lists'
    own); the rows kept now are Arrow int32 columns, outside Python's heap, 4 bytes a token and column."""
    recipe = QLoRARecipe(JobSpec.parse(short_spec(tiny_model_dir, max_steps=2)),
                         write_jsonl(demo_rows(1, 400), tmp_path / "train.jsonl"), tmp_path / "out")
    # setup() up to the encoding (its order, recipe.setup)
    recipe.out.mkdir(parents=True, exist_ok=True)
    recipe._setup_data()
    recipe._pick_device()
    recipe._setup_device()
    recipe._setup_run_dir()
    recipe._setup_tokenizer()
    gc.collect()
    tracemalloc.start()
    try:
        recipe._encode_data()
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tokens = recipe.train_stats.tokens
    assert tokens > 5_000 and len(recipe.train_rows) == 400
    assert held / tokens < 4  # was ~49: the ids and labels as Python lists
    assert recipe.train_rows.data.nbytes < 12 * tokens  # int32 ids and labels, and each row's offsets
