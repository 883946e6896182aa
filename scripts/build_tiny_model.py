"""Build the embedded default base model: a tiny GLM with a tokenizer trained on the toy data.

    python scripts/build_tiny_model.py                     # -> models/tiny-glm (about 30 s on 2 CPU cores)
    python scripts/build_tiny_model.py --out models/x --steps 0   # random weights, for quick experiments

train.sh / evaluate.sh call this when MODEL points at models/tiny-glm and the folder is missing.

No model can be downloaded where glmtune must run (CI, offline machines), so the demo and the tests
build their own base: a byte-level BPE tokenizer trained on the toy ADGEN text and a small GLM
(transformers' native architecture) whose weights are briefly pretrained on that text as plain language
modelling (descriptions and attribute lists on their own, never the attribute -> description task), so
that fine-tuning has a base that knows the words but not the task.
"""

import argparse
import fcntl
import json
import os
import random
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

from glmtune.report import quiet_progress_bars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRETRAIN_STEPS = 200
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
TINY_SHAPE = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=384,
    partial_rotary_factor=0.5,
    attention_bias=True,
    max_position_embeddings=1024,
)

TINY_LLAMA_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=512,
)
BASE_VOCABULARY = 600  # small, as LLaMA's is for Chinese: most words split into several tokens


def read_texts(data_file: str) -> list[str]:
    """Each record of an ADGEN-format JSON-lines file as raw text: attribute list, newline, description."""
    with open(data_file, encoding="utf-8") as f:
        return [f"{record['content']}\n{record['summary']}" for record in map(json.loads, f)]


def train_tokenizer(texts: list[str], vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    # Byte-level BPE: any text round-trips through encode/decode, even characters never seen here.
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={
            "user_token": "<|user|>",
            "assistant_token": "<|assistant|>",
            "system_token": "<|system|>",
        },
    )


def tiny_model(tokenizer, seed: int = 0, **shape) -> GlmForCausalLM:
    torch.manual_seed(seed)
    config = GlmConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **{**TINY_SHAPE, **shape},
    )
    return GlmForCausalLM(config)


def pretrain(model, tokenizer, texts: list[str], steps: int, batch_size: int = 24, seed: int = 0, lr: float = 4e-3):
    """Plain next-token prediction on single texts, each ended by eos. Returns the last loss."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20) * (1 - step / steps))
    model.train()
    loss = None
    for _ in range(steps):
        batch = tokenizer(
            [t + tokenizer.eos_token for t in rng.sample(texts, batch_size)],
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def build(data_file: str, out_dir: str, steps: int = PRETRAIN_STEPS, seed: int = 0, **shape) -> float:
    """Tokenizer + tiny GLM pretrained for ``steps`` steps, saved to ``out_dir``. Returns the last loss."""
    texts = read_texts(data_file)
    tokenizer = train_tokenizer(texts)
    model = tiny_model(tokenizer, seed=seed, **shape)
    loss = pretrain(model, tokenizer, texts, steps, seed=seed) if steps else float("nan")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return loss


def build_llama(data_file: str, out_dir: str, added_words: int = 24, seed: int = 0, **shape) -> list[str]:
    """A tiny Llama (random weights) whose tokenizer has tokens its embeddings lack: the toy tokenizer plus the
    most frequent attribute words of the data as whole tokens, as Chinese-LLaMA extends LLaMA's vocabulary with
    Chinese words (PromptCBLUE's LLaMA-7B recipe), so len(tokenizer) > vocab_size. Returns the added words."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = read_texts(data_file)
    tokenizer = train_tokenizer(texts, vocab_size=BASE_VOCABULARY)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,  # as LLaMA-7B: the added rows of lm_head are trained and saved on their own
        **{**TINY_LLAMA_SHAPE, **shape},
    )
    model = LlamaForCausalLM(config)
    words = _frequent_split_words(texts, tokenizer, added_words)
    tokenizer.add_tokens(words)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return words


def _frequent_split_words(texts: list[str], tokenizer, count: int) -> list[str]:
    """The ``count`` most frequent attribute values (``类型#裙*颜色#白色`` -> 裙, 白色) that the tokenizer splits."""
    frequency = {}
    for text in texts:
        for pair in text.split("\n", 1)[0].split("*"):
            for word in pair.split("#"):
                frequency[word] = frequency.get(word, 0) + 1
    ranked = sorted(frequency, key=lambda word: (-frequency[word], word))
    return [word for word in ranked if len(tokenizer.tokenize(word)) > 1][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(REPO, "data/adgen-toy/train.json"), help="text to learn from")
    parser.add_argument("--out", default=os.path.join(REPO, "models/tiny-glm"), help="output model folder")
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS, help="pretraining steps (0: random weights)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_progress_bars()
    out = args.out.rstrip("/")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # Two runs started at once on a fresh checkout both find no model: the second waits for the first's build
    # (they would both write out.partial and the slower rename would fail on the folder the faster one made).
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(out, "config.json")):
            print(f"{out} was built meanwhile by another run")
            return
        start = time.time()
        staging = out + ".partial"
        loss = build(args.data, staging, steps=args.steps, seed=args.seed)
        os.replace(staging, out)  # a half-built model folder never looks like a model
    print(f"Built {out} in {time.time() - start:.0f} s (pretraining loss {loss:.3f})")


if __name__ == "__main__":
    main()
