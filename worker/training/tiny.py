"""A tiny Llama-architecture model and tokenizer, built on the spot, for tests and demos.

No model hub is reachable on our CI and laptops, so the suite and the quickstart train this:
a few million parameters, a byte-level BPE tokenizer trained on a small synthetic corpus,
a chat template, safetensors weights. Everything is a pure function of the seed.

It comes with a demo task that has one right answer per prompt (which sound an animal makes),
so a test or a new user can see a fine-tune learn something checkable in about a minute.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from worker.training.tokenization import DEFAULT_CHAT_TEMPLATE

ANIMAL_SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
    "horse": "neigh", "owl": "hoot", "lion": "roar", "snake": "hiss", "bee": "buzz", "frog": "croak",
    "mouse": "squeak", "crow": "caw", "goat": "bleat", "wolf": "howl", "dove": "coo", "hen": "cluck",
    "donkey": "bray", "bear": "growl", "turkey": "gobble", "goose": "honk", "cricket": "chirp", "seal": "bark",
}
_ASKERS = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
_TEMPLATES = [
    "{who} asks: what sound does the {animal} make?",
    "{who} wants to know what the {animal} says.",
    "Which sound does a {animal} make, asks {who}?",
    "Hey, {who} here. What does the {animal} say?",
]
_FILLER = (
    "the a an is are was of to and in on at for with from by this that it as be you we they "
    "hello thanks please answer question model data train learn small test sound make say ask know "
    "zero one two three four five six seven eight nine ten yes no maybe good bad fast slow"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def demo_rows(seed: int, count: int, *, split: str = "train", distinct: bool = False) -> list[dict]:
    """Chat rows for the demo task. `split="heldout"` gives prompts never seen in "train":
    the (template, asker) pairs are disjoint, every animal appears in both.

    `distinct`: no row repeats until every pair has asked about every animal (864 train rows, 288 held
    out), as the demo dataset's files are made (`qlora demo-data`): preflight warns of repeated rows, and
    480 rows drawn independently repeat a quarter of themselves. Without it each row's pair is drawn
    independently, as the tokenizer's corpus and the tests tuned on small sets (health watch, DPO) were."""
    rng = random.Random(f"{seed}-{split}")
    pairs = [(t, w) for t in range(len(_TEMPLATES)) for w in range(len(_ASKERS))]
    heldout_pairs = {p for p in pairs if (p[0] + p[1]) % 4 == 0}
    pool = sorted(heldout_pairs) if split == "heldout" else [p for p in pairs if p not in heldout_pairs]
    animals = list(ANIMAL_SOUNDS)
    # each animal's pairs in an order of its own, asked in turn
    asked = {animal: rng.sample(pool, len(pool)) for animal in animals} if distinct else None
    rows = []
    for i in range(count):
        animal = animals[i % len(animals)]
        template, who = asked[animal][i // len(animals) % len(pool)] if asked else rng.choice(pool)
        prompt = _TEMPLATES[template].format(who=_ASKERS[who], animal=animal)
        rows.append({"messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": f"The {animal} says {ANIMAL_SOUNDS[animal]}."},
        ]})
    rng.shuffle(rows)
    return rows


def demo_pairs(seed: int, count: int, *, split: str = "train", distinct: bool = False) -> list[dict]:
    """The demo task as preference rows (OpenAI's format) for DPO: the right sound preferred over
    another animal's, for the prompts of demo_rows(seed, count, split=split, distinct=distinct)."""
    sounds = list(ANIMAL_SOUNDS.values())
    rows = []
    for i, row in enumerate(demo_rows(seed, count, split=split, distinct=distinct)):
        user, answer = row["messages"]
        right = answer["content"]
        wrong_sound = next(s for s in sounds[i % len(sounds):] + sounds if f" {s}." not in right)
        wrong = right.rsplit(" ", 1)[0] + f" {wrong_sound}."
        rows.append({"input": {"messages": [user]}, "preferred_output": [{"role": "assistant", "content": right}],
                     "non_preferred_output": [{"role": "assistant", "content": wrong}]})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tokenizer(seed: int = 0, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = []
    for row in demo_rows(seed, 400) + demo_rows(seed, 100, split="heldout"):
        corpus.extend(m["content"] for m in row["messages"])
    words = _FILLER.split() + list(ANIMAL_SOUNDS) + list(ANIMAL_SOUNDS.values()) + _ASKERS
    corpus.extend(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000))

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any UTF-8 text encodes, nothing is <unk>
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Plain text gets a BOS like Llama's tokenizer; chat text gets it from the template instead.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    # Deliberately no pad token, like Llama's: the engine must pick one that is not EOS.
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 704,  # bitsandbytes' CPU kernel packs rows in blocks of 32
    model_type: str = "llama",
    spare_embedding_rows: int = 0,
    **family,
) -> Path:
    """Write a randomly initialised Llama model (~4M parameters) with its tokenizer to out_dir; or,
    with `model_type` (a transformers config.json's), one of another family at the same size, given
    that family's own config fields in `family` (head_dim, ...). `spare_embedding_rows`: embedding rows past
    the tokenizer's last id, as Qwen's and Gemma 3's are padded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer) + spare_embedding_rows,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2,  # grouped-query attention, as in current Llama models
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        dtype="float32",
        **family,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # A random head at the usual std 0.02 caps logits near ±5 (0.02 · |h| with |h| = sqrt(256)),
        # far flatter than a pretrained model's: a LoRA could pick the right token but never grow
        # confident, so the loss would stall near 2 nats. Twice the scale behaves like a real LM head.
        model.get_output_embeddings().weight.mul_(2.0)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def demo_spec(base_model: str) -> dict:
    """A spec that learns the demo task on a laptop CPU in well under a minute."""
    return {
        "base_model": base_model,
        "lora": {"dropout": 0.0},  # 4M parameters and 480 rows: nothing to regularise
        "training": {
            "max_steps": 160,
            "learning_rate": 3e-3,  # a tiny random-init base needs a larger step than a 7B model
            "lr_scheduler": "cosine",
            "per_device_batch_size": 16,
            "gradient_accumulation_steps": 1,
            "max_seq_length": 64,
            "logging_steps": 10,
            "eval_steps": 40,
            "save_steps": 40,
        },
        # The demo's answers are six tokens and EOS: 16 new tokens show whether the model stopped.
        "eval": {"prompts": 8, "max_new_tokens": 16},
    }


def score_demo(model, tokenizer, rows: list[dict], max_new_tokens: int = 16) -> dict:
    """Greedy-generate an answer for each row's user turn; how many are exactly right, how many stop by themselves."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    right = stopped = 0
    samples = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        stopped += tokenizer.eos_token_id in new
        answer = tokenizer.decode(new, skip_special_tokens=True).strip()
        right += answer == row["messages"][-1]["content"]
        samples.append(answer)
    return {"accuracy": right / len(rows), "stop_rate": stopped / len(rows), "samples": samples[:5]}
