"""Training and evaluation speed and memory on one GPU: glmtune against the naive transformers + PEFT path.

    python scripts/benchmark.py                 # ChatGLM3-6B-shaped GLM, random weights, all rows (H200: 7 min)
    python scripts/benchmark.py --rows train    # or: eval, or a comma list of row names (see ROWS)
    python scripts/benchmark.py --tiny          # a 2-layer model, to check the script itself (CPU works)
    python scripts/benchmark.py --rows recipe   # the ancestors' recipe within memory budgets (benchmark_recipe.py)
    python scripts/benchmark.py --rows pt-bf16-throughput --batches 8,16 --profile out/   # batch search, kernels

Both sides run the same model folder, the same synthetic samples and the same step counts, in one
process, one row after another. glmtune's side is its real code path with train.sh's defaults on a GPU
(load_base_model, add_prefix_encoder / add_lora, padding-free batches, compiled decoder layers for
bf16 bases, the target-token loss, GlmtuneTrainer); the naive side is what a user writes with
transformers + PEFT: PrefixTuningConfig / LoraConfig, Trainer defaults, every sample padded to the
maximum length, prepare_model_for_kbit_training for 8/4-bit bases. PEFT's prefix tuning refuses gradient
checkpointing, so its rows run without it. MFU counts 4 x (parameters outside the input embedding)
FLOP per real (non-padding) token, against 800 TFLOP/s (H100 bf16 dense); recomputation is not counted.
Tokens are counted in the batches the timed steps actually trained on (the Trainer shuffles). Every row
draws its adapter initialisation from the same seed. Both sides log the loss once, when the timed
steps end (a logged loss is a host sync), and the timer synchronizes only at the window's edges.
"""

import argparse
import gc
import json
import math
import os
import random
import time
import traceback
from dataclasses import dataclass

import torch
from transformers import GlmConfig, GlmForCausalLM, Seq2SeqTrainingArguments, Trainer, TrainerCallback

from glmtune.arguments import LoraArguments, ModelArguments, PtuningArguments
from glmtune.data import Collator, PaddingFreeCollator
from glmtune.lora import add_lora
from glmtune.model import load_base_model, quantization_config
from glmtune.ptuning import add_prefix_encoder
from glmtune.speed import FastStepTrainer, compile_decoder_layers
from glmtune.speed.attention import use_fast_attention
from glmtune.speed.fast_lora import lora_in_base_dtype
from glmtune.speed.int8 import dequantized_int8_training
from glmtune.trainer import GlmtuneTrainer

PEAK_FLOPS = 800e12
CHATGLM3_6B = dict(
    vocab_size=65024,
    hidden_size=4096,
    num_hidden_layers=28,
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    intermediate_size=13696,
    attention_bias=True,
    partial_rotary_factor=0.5,
    max_position_embeddings=8192,
    pad_token_id=0,
    eos_token_id=2,
    bos_token_id=None,
    tie_word_embeddings=False,
)
TINY = dict(
    CHATGLM3_6B,
    vocab_size=1024,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=32,
    intermediate_size=256,
)
# setting -> micro-batch, (min, max) prompt tokens, (min, max) answer tokens, gradient checkpointing
SETTINGS = {
    "recipe": dict(batch=1, source=(64, 64), target=(64, 64), checkpointing=True),  # ChatGLM's train.sh
    "throughput": dict(batch=8, source=(192, 256), target=(192, 256), checkpointing=False),
}
ROWS = [  # name: method, quantization bits, setting
    ("pt-bf16-recipe", "ptuning", None, "recipe"),
    ("pt-bf16-throughput", "ptuning", None, "throughput"),
    ("pt-int8-recipe", "ptuning", 8, "recipe"),
    ("pt-int8-throughput", "ptuning", 8, "throughput"),
    ("pt-int4-recipe", "ptuning", 4, "recipe"),
    ("pt-int4-throughput", "ptuning", 4, "throughput"),
    ("lora-bf16-recipe", "lora", None, "recipe"),
    ("lora-bf16-throughput", "lora", None, "throughput"),
    ("lora-int8-recipe", "lora", 8, "recipe"),
    ("lora-int4-recipe", "lora", 4, "recipe"),
    ("lora-int4-throughput", "lora", 4, "throughput"),
]
PRE_SEQ_LEN = 128


@dataclass
class Result:
    row: str
    impl: str
    precision: str
    shape: str
    tokens_per_s: float
    samples_per_s: float
    peak_gib: float
    mfu: float
    loss: float
    losses: list = None
    note: str = ""


# ----------------------------------------------------------------------------- model and data


def ensure_model(folder: str, shape: dict) -> None:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = GlmForCausalLM(GlmConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def synthetic_samples(count: int, setting: dict, vocab: int, seed: int = 0) -> list:
    """Token ids with prompt/answer lengths drawn from the setting's ranges (real data varies too)."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(*setting["source"]))]
        answer = [rng.randrange(3, vocab) for _ in range(rng.randint(*setting["target"]))]
        samples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return samples


def pad_to_max(samples: list, length: int) -> list:
    """The naive path: every sample padded to the maximum length up front (as ChatGLM's scripts do)."""
    return [
        {
            "input_ids": s["input_ids"] + [0] * (length - len(s["input_ids"])),
            "attention_mask": [1] * len(s["input_ids"]) + [0] * (length - len(s["input_ids"])),
            "labels": s["labels"] + [-100] * (length - len(s["labels"])),
        }
        for s in samples
    ]


def flops_per_token(folder: str) -> float:
    """4 x the base's parameters outside the input embedding (a lookup costs no FLOPs), counted on a meta
    copy so that packed 4-bit storage does not hide parameters."""
    with torch.device("meta"):
        model = GlmForCausalLM(GlmConfig.from_pretrained(folder))
    return 4 * (model.num_parameters() - model.get_input_embeddings().weight.numel())


# ----------------------------------------------------------------------------- timing


class StepTimer(TrainerCallback):
    """Times steps warmup+1 .. warmup+steps; with ``profile_to``, profiles two more steps after them."""

    def __init__(self, warmup: int, steps: int, profile_to: str | None = None, name: str = ""):
        self.warmup, self.last, self.start, self.end = warmup, warmup + steps, None, None
        self.profile_to, self.name, self.profiler = profile_to, name, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profile_to and state.global_step == self.last:
            self.profiler = torch.profiler.profile(activities=_profiled_activities())
            self.profiler.start()
            self.profile_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        # Synchronize only at the window's edges: a sync every step would stall the host's run-ahead.
        if state.global_step in (self.warmup, self.last) and torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        if state.global_step == self.last:
            self.end = time.perf_counter()
        if self.profiler is not None and state.global_step == self.last + PROFILED_STEPS:
            self.profiler.stop()
            write_profile(self.profiler, time.perf_counter() - self.profile_start, self.profile_to, self.name)
            self.profiler = None


class TokenCounter:
    """Wraps a collator and records the real (attention-mask) tokens of every batch it builds, in order."""

    def __init__(self, collate):
        self.collate, self.tokens, self.samples = collate, [], []

    def __call__(self, features):
        batch = self.collate(features)
        real = (
            batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        )  # padding-free
        self.tokens.append(int(real))
        self.samples.append(len(features))
        return batch


PROFILED_STEPS = 2


def _profiled_activities() -> list:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def write_profile(profiler, wall_s: float, folder: str, name: str) -> None:
    """The kernel table (by GPU time) and GPU time per kernel family, for PROFILED_STEPS steps."""
    events = profiler.key_averages()
    kernels = [e for e in events if _device_us(e) > 0 and str(getattr(e, "device_type", "")).endswith("CUDA")]
    families = {}
    for e in kernels:
        family = _kernel_family(e.key)
        families[family] = families.get(family, 0.0) + _device_us(e)
    busy = sum(families.values()) / 1e6
    lines = [
        f"{name}: {PROFILED_STEPS} steps, wall {wall_s:.3f} s, "
        f"GPU kernels {busy:.3f} s ({100 * busy / wall_s:.0f}% busy)"
    ]
    lines += [
        f"  {family:<28} {us / 1e3:9.1f} ms  {100 * us / 1e6 / busy:5.1f}%"
        for family, us in sorted(families.items(), key=lambda item: -item[1])
    ]
    lines += ["", "top kernels (self GPU time):"]
    lines += [
        f"  {_device_us(e) / 1e3:9.2f} ms  {e.count:6d}x  {e.key[:150]}"
        for e in sorted(kernels, key=_device_us, reverse=True)[:45]
    ]
    lines += ["", *idle_report(profiler.events())]
    text = "\n".join(lines)
    print(text, flush=True)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"profile-{name.replace('+', '_')}.txt"), "w") as f:
        f.write(text + "\n")


# host-side CUDA runtime calls that can wait for the GPU (an async copy waits when its host memory is pageable)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def idle_report(events, largest: int = 12) -> list:
    """Where the GPU waits: the gaps between kernels, the host ops running in the largest ones, and the
    host calls that wait for the GPU (syncs), with the ops that made them."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if _on_gpu(e))
    if not kernels:
        return ["no GPU kernels recorded"]
    gaps, end, previous = [], kernels[0][1], kernels[0][2]
    for start, stop, kernel in kernels[1:]:
        if start > end:
            gaps.append((start - end, end, previous, kernel))
        if stop > end:
            end, previous = stop, kernel
    span = end - kernels[0][0]
    idle = sum(g[0] for g in gaps)
    lines = [
        f"GPU idle between its first and last kernel: {idle / 1e3:.1f} of {span / 1e3:.1f} ms "
        f"({100 * idle / span:.0f}%); "
        f"gaps > 0.1 ms: {sum(1 for g in gaps if g[0] > 100)}, {sum(g[0] for g in gaps if g[0] > 100) / 1e3:.1f} ms"
    ]
    host = [e for e in events if not _on_gpu(e)]
    for length, at, before, after in sorted(gaps, reverse=True)[:largest]:
        running = [e.name for e in host if e.time_range.start <= at + length / 2 <= e.time_range.end][:5]
        lines.append(
            f"  gap {length / 1e3:7.2f} ms after {before[:50]!r} before {after[:50]!r}; "
            f"host in: {' > '.join(running)[:160]}"
        )
    syncs = {}
    for e in host:
        if e.name in SYNC_CALLS:
            chain, parent = [], e.cpu_parent
            while parent is not None and len(chain) < 4:
                chain.append(parent.name)
                parent = parent.cpu_parent
            key = f"{e.name} <- {' <- '.join(chain)}"[:170]
            count, total = syncs.get(key, (0, 0.0))
            syncs[key] = (count + 1, total + e.time_range.end - e.time_range.start)
    lines.append(f"host calls that wait for the GPU ({sum(c for c, _ in syncs.values())}):")
    lines += [
        f"  {count:4d}x {total / 1e3:8.2f} ms  {key}"
        for key, (count, total) in sorted(syncs.items(), key=lambda i: -i[1][1])[:15]
    ]
    return lines


def _on_gpu(event) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CUDA")


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def _kernel_family(name: str) -> str:
    lowered = name.lower()
    for family, needles in (
        ("attention (flash)", ("flash",)),
        ("attention (mem-efficient)", ("fmha", "efficient_attention")),
        ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
        ("triton (compiled)", ("triton",)),
        ("cross-entropy / softmax", ("softmax", "nll", "log_softmax")),
        ("copy / cast", ("copy", "cast", "cat", "fill")),
        ("optimizer", ("adam", "foreach", "multi_tensor")),
    ):
        if any(n in lowered for n in needles):
            return family
    return "other elementwise / reduction"


def training_args(
    output_dir: str, setting: dict, steps: int, logging_steps: int, glmtune: bool, accumulation: int = 1
) -> Seq2SeqTrainingArguments:
    """Logging reads the loss back from the GPU (a sync): once, when the timed window ends, for both sides."""
    extra = {}
    if glmtune:
        extra = dict(
            gradient_checkpointing=setting["checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False},
            remove_unused_columns=False,
            label_names=["labels"],
            accelerator_config={"non_blocking": torch.cuda.is_available()},
        )  # as glmtune.parsing sets them
    return Seq2SeqTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=setting["batch"],
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        logging_steps=logging_steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",  # the same learning rates whatever the number of steps (profiling adds two)
        use_cpu=not torch.cuda.is_available(),
        **extra,
    )


def measure(trainer, setting: dict, args, row, impl, precision, n_flops, accumulation: int = 1) -> Result:
    timer = StepTimer(args.warmup, args.steps, args.profile if impl == "glmtune" else None, f"{row}-{setting['batch']}")
    trainer.add_callback(timer)
    counter = trainer.data_collator = TokenCounter(trainer.data_collator)
    reset_peak_memory()
    trainer.train()
    # micro-batch i is trained at optimizer step i // accumulation + 1
    timed = slice(args.warmup * accumulation, (args.warmup + args.steps) * accumulation)
    tokens, samples = sum(counter.tokens[timed]), sum(counter.samples[timed])
    seconds = timer.end - timer.start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]  # one entry: the mean over the run's steps
    peak = peak_memory_gib()
    tokens_per_s = tokens / seconds
    return Result(
        row,
        impl,
        precision,
        f"{setting['batch']}{f' x {accumulation}' if accumulation > 1 else ''}"
        f"x{setting['source'][1] + setting['target'][1]}",
        tokens_per_s,
        samples / seconds,
        peak,
        tokens_per_s * n_flops / PEAK_FLOPS,
        losses[0],
        losses,
    )


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    """torch.cuda.max_memory_allocated since the last reset_peak_memory(); NaN (not measured) without CUDA."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def sample_count(args, setting: dict) -> int:
    """As many samples whether or not glmtune's rows profile two more steps, so both sides (and a profiled
    and an unprofiled run) train the timed steps on the same samples in the same order."""
    return (args.warmup + args.steps + PROFILED_STEPS) * setting["batch"]


def total_steps(args, impl: str) -> int:
    return args.warmup + args.steps + (PROFILED_STEPS if args.profile and impl == "glmtune" else 0)


# ----------------------------------------------------------------------------- the two implementations


def run_glmtune(folder, row, method, bits, setting, args) -> Result:
    model = load_base_model(ModelArguments(model_name_or_path=folder, quantization_bit=bits, torch_dtype="bfloat16"))
    torch.manual_seed(0)  # the same adapter initialisation in every row of a method
    if method == "ptuning":
        model = add_prefix_encoder(model, PtuningArguments(pre_seq_len=PRE_SEQ_LEN, prefix_dropout=0.0))
    else:
        model = add_lora(model, LoraArguments(lora_rank=8, lora_alpha=32, lora_dropout=0.0, lora_target="all"))
    if args.padding_free:  # as train.sh on a CUDA GPU (glmtune.speed.prepare)
        use_fast_attention(model)
    if bits == 8:  # as glmtune.speed.prepare for training
        dequantized_int8_training(model, torch.bfloat16)
    if torch.cuda.is_available():
        lora_in_base_dtype(model, quantized=args.quantized_lora_branch == "bf16")
    if compiled(args):
        compile_decoder_layers(model)
    steps = total_steps(args, "glmtune")
    samples = synthetic_samples(sample_count(args, setting), setting, model.config.vocab_size)
    collator = PaddingFreeCollator() if args.padding_free else Collator(0, "right", with_target_index=True)
    trainer = FastStepTrainer(
        model=model,
        args=training_args(args.scratch, setting, steps, args.warmup + args.steps, True),
        train_dataset=samples,
        data_collator=collator,
    )
    return measure(trainer, setting, args, row, "glmtune", _precision(bits), flops_per_token(folder))


def compiled(args) -> bool:
    """--compile_layers as train.sh defaults it (glmtune.parsing): on when training on a GPU."""
    return args.compile_layers if args.compile_layers is not None else torch.cuda.is_available()


def run_naive(folder, row, method, bits, setting, args, samples=None, accumulation: int = 1) -> Result:
    """``samples``: tokenized samples to train on (default: synthetic ones of the setting's lengths)."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, default_data_collator

    kwargs = {"dtype": torch.bfloat16}
    if bits:
        kwargs.update(quantization_config=quantization_config(bits, torch.bfloat16), device_map={"": 0})
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    checkpointing = setting["checkpointing"] and method == "lora"  # PEFT's prefix tuning refuses it
    if bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if method == "ptuning":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PRE_SEQ_LEN)
    else:
        config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    torch.manual_seed(0)
    model = get_peft_model(model, config)
    steps = total_steps(args, "naive")
    if samples is None:
        samples = synthetic_samples(sample_count(args, setting), setting, model.config.vocab_size)
    padded = pad_to_max(samples, setting["source"][1] + setting["target"][1])
    train_args = training_args(
        args.scratch, {**setting, "checkpointing": False}, steps, args.warmup + args.steps, False, accumulation
    )
    trainer = Trainer(model=model, args=train_args, train_dataset=padded, data_collator=default_data_collator)
    return measure(trainer, setting, args, row, "naive", _precision(bits), flops_per_token(folder), accumulation)


def _precision(bits) -> str:
    return {None: "bf16", 8: "int8", 4: "nf4"}[bits]


# ----------------------------------------------------------------------------- evaluation


def run_generation(folder, args, report=lambda result: None) -> list:
    """Greedy, 64 new tokens, ADGEN-length prompts, glmtune's batched predict for the base, a P-Tuning v2 prefix and
    a LoRA adapter, with the dynamic and the static key/value cache (its answers compared with the dynamic one's); and
    one prompt at a time (prefix, dynamic cache). ``report`` gets each row as it ends (a run cut short keeps them)."""
    vocab = GlmConfig.from_pretrained(folder).vocab_size
    samples = synthetic_samples(args.prompts, {"source": (24, 64), "target": (1, 1)}, vocab)
    prompts = [{"input_ids": s["input_ids"][:-1], "labels": s["input_ids"][-1:]} for s in samples]
    results = []
    for method in ("base", "ptuning", "lora"):
        model = _generation_model(folder, method)
        answers = {}
        for cache in ("dynamic", "static"):
            rate, peak, answers[cache] = _predict(model, prompts, args, cache)
            same = "" if cache == "dynamic" else agreement(answers[cache], answers["dynamic"])
            shape = f"{len(prompts)} prompts, bs {args.eval_batch}"
            results.append(Result("generate", f"{method} {cache}", "bf16", shape, rate, rate / 64, peak, 0,
                                  float("nan"), note=same))  # fmt: skip
            report(results[-1])
        if method == "ptuning":
            results.append(_one_at_a_time(model, prompts[: args.single_prompts]))
            report(results[-1])
        del model
        free_memory()
    return results


def agreement(answers: list, reference: list) -> str:
    """How far two sets of greedy answers agree: whole answers, first tokens, and the mean length of the common
    start. On random weights the top logits nearly tie, so bf16 rounding flips later tokens (2026-12-03, H200:
    0 of 512 whole answers equal); the first token and the common start tell rounding from a wrong cache."""
    starts = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(answers, reference)]
    whole = sum(map(list.__eq__, answers, reference))
    first = sum(start > 0 for start in starts)
    return f"{whole} same, first token {first}/{len(starts)}, common start {sum(starts) / len(starts):.1f} tokens"


GENERATE = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=2, use_cache=True)


def _generation_model(folder, method):
    model = load_base_model(ModelArguments(model_name_or_path=folder, torch_dtype="bfloat16"))
    torch.manual_seed(0)
    if method == "base":
        return model.eval()
    if method == "ptuning":
        return add_prefix_encoder(model, PtuningArguments(pre_seq_len=PRE_SEQ_LEN, prefix_dropout=0.0)).eval()
    model = add_lora(model, LoraArguments(lora_rank=8, lora_alpha=32, lora_dropout=0.0, lora_target="all"))
    for name, parameter in model.named_parameters():  # B = 0 at initialisation: the adapter would change nothing
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model.eval()


def _predict(model, prompts, args, cache: str) -> tuple:
    """New tokens per second, peak GiB and the generated ids of every prompt (the first batch is a warm-up)."""
    eval_args = Seq2SeqTrainingArguments(
        output_dir=args.scratch, per_device_eval_batch_size=args.eval_batch, report_to="none",
        predict_with_generate=True, disable_tqdm=True, remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    generate = {**GENERATE, **({"cache_implementation": "static"} if cache == "static" else {})}
    trainer = GlmtuneTrainer(model=model, args=eval_args, data_collator=Collator(0, "left"), generate_kwargs=generate)
    trainer.predict(prompts[: args.eval_batch])  # warm-up (and, with the static cache, compilation)
    reset_peak_memory()
    start = time.perf_counter()
    output = trainer.predict(prompts)
    rate = len(prompts) * 64 / (time.perf_counter() - start)
    return rate, peak_memory_gib(), [list(row) for row in output.predictions.tolist()]


def _one_at_a_time(model, prompts) -> Result:
    reset_peak_memory()
    start = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([prompt["input_ids"]], device=model.device)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GENERATE)
    rate = len(prompts) * 64 / (time.perf_counter() - start)
    return Result("generate", "one at a time", "bf16", f"{len(prompts)} prompts, bs 1", rate, rate / 64,
                  peak_memory_gib(), 0, float("nan"))  # fmt: skip


# ----------------------------------------------------------------------------- main


def free_memory() -> None:
    torch._dynamo.reset()  # each row compiles afresh (from the on-disk cache), not against the last row's guards
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(results: list) -> None:
    naive = {(r.row, r.shape): r for r in results if r.impl == "naive"}
    single = next((r for r in results if r.impl == "one at a time"), None)
    print(
        "\n| row | impl | precision | batch x len | tokens/s | samples/s | peak GiB | MFU "
        "| vs naive (speed, memory) | mean loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        batched = r.row == "generate" and r.impl != "one at a time"
        base = naive.get((r.row, r.shape)) if r.impl == "glmtune" else (single if batched else None)
        ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base else ""
        if base and r.impl == "glmtune" and not math.isnan(r.peak_gib):  # no memory figure without CUDA
            ratio += f", {r.peak_gib / base.peak_gib:.2f}x"
        if r.note:  # the static cache's answers: how many equal the dynamic cache's
            ratio += f"; {r.note}"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu else ""
        peak, loss = (
            "" if math.isnan(value) else f"{value:.{digits}f}" for value, digits in ((r.peak_gib, 2), (r.loss, 4))
        )
        print(
            f"| {r.row} | {r.impl} | {r.precision} | {r.shape} | {r.tokens_per_s:,.0f} | {r.samples_per_s:.2f} | "
            f"{peak} | {mfu} | {ratio} | {loss} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows",
        default="all",
        help="all, train, eval, or a comma list of row names (ROWS, and generate: the evaluation rows), "
        "run in that order",
    )
    parser.add_argument("--impl", default="glmtune,naive", help="which implementations to run")
    parser.add_argument(
        "--model", default="/tmp/glmtune-bench/chatglm3-6b-shaped", help="model folder (built if missing)"
    )
    parser.add_argument("--scratch", default="/tmp/glmtune-bench/scratch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=1070, help="ADGEN dev size")
    parser.add_argument("--eval_batch", type=int, default=128)
    parser.add_argument(
        "--single_prompts",
        type=int,
        default=8,
        help="prompts generated one at a time (64 tokens each at ~20 tokens/s on an H100)",
    )
    parser.add_argument(
        "--batches", default="8", help="micro-batch sizes of the throughput rows (a comma list: a search)"
    )
    parser.add_argument("--profile", default=None, help="folder: profile 2 steps after the timed ones of glmtune rows")
    parser.add_argument(
        "--compile_layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="glmtune rows, recipe rows too: compiled decoder layers (default as train.sh: on a GPU)",
    )
    parser.add_argument(
        "--padding_free",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glmtune rows: padding-free batches, as train.sh on a GPU (--no-padding_free: padded)",
    )
    parser.add_argument(
        "--quantized_lora_branch",
        choices=("bf16", "peft"),
        default="bf16",
        help="glmtune's LoRA rows on 4/8-bit bases: the branch in bf16 as train.sh (bf16), or PEFT's float32 forward",
    )
    recipe = parser.add_argument_group("recipe section (--rows recipe; scripts/benchmark_recipe.py)")
    recipe.add_argument(
        "--budgets",
        default="6,8,16,24,naive",
        help="GiB: the cards emulated; naive: the naive row's measured peak (the same memory, compared)",
    )
    recipe.add_argument("--precisions", default="nf4,int8,bf16")
    recipe.add_argument("--recipe_methods", default="ptuning,lora")
    recipe.add_argument(
        "--shared",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared"),
        help="the shared material: the real chatglm3 tokenizer and AdvertiseGen rows (default: ../shared)",
    )
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, to check this script")
    parser.add_argument("--json", default=None, help="also append the results here, a JSON line per row as it ends")
    args = parser.parse_args()
    if args.quantized_lora_branch == "peft" and compiled(args):
        # compile_decoder_layers switches every LoRA layer to the bf16 branch, so the flag would measure nothing
        parser.error("--quantized_lora_branch peft needs uncompiled layers: add --no-compile_layers")
    if args.rows == "recipe":
        import benchmark_recipe  # beside this script

        print(environment(), flush=True)
        benchmark_recipe.run(args, args.shared)
        return
    wanted = [name for name, *_ in ROWS] if args.rows in ("all", "train") else args.rows.split(",")  # in this order
    impls = args.impl.split(",")
    results = []
    if args.rows == "eval":
        wanted = ["generate"]
    elif args.rows == "all":
        wanted.append("generate")
    rows = {row[0]: row for row in ROWS + [("generate", None, None, None)]}
    unknown = [name for name in wanted if name not in rows]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; known: {', '.join(rows)}")
    print(environment(), flush=True)
    ensure_model(args.model, TINY if args.tiny else CHATGLM3_6B)
    for name, method, bits, setting_name in (rows[name] for name in wanted):  # in the order asked for
        if name == "generate":  # where the list puts it: a run cut short keeps the rows before it
            results += run_generation(args.model, args, report=lambda result: report(args, result))
            continue
        if bits and not torch.cuda.is_available():
            continue
        batches = (
            [int(b) for b in args.batches.split(",")]
            if setting_name == "throughput"
            else [SETTINGS[setting_name]["batch"]]
        )
        for batch, impl in [(b, i) for b in batches for i in impls]:
            runner = run_glmtune if impl == "glmtune" else run_naive
            started = time.perf_counter()
            try:
                results.append(runner(args.model, name, method, bits, {**SETTINGS[setting_name], "batch": batch}, args))
                report(args, results[-1], f"({time.perf_counter() - started:.0f} s)")
            except torch.OutOfMemoryError:
                print(f"{name} {impl} micro-batch {batch}: out of memory", flush=True)
            except Exception:  # one broken row must not cost the others' measurements (GPU time is scarce)
                traceback.print_exc()
                print(f"{name} {impl} micro-batch {batch}: failed (traceback above)", flush=True)
            free_memory()
    print_table(results)


def environment() -> str:
    """The device and library versions, printed first: every recorded table needs them."""
    import peft
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    versions = [f"torch {torch.__version__}", f"transformers {transformers.__version__}", f"peft {peft.__version__}"]
    try:
        import bitsandbytes

        versions.append(f"bitsandbytes {bitsandbytes.__version__}")
    except ImportError:
        versions.append("no bitsandbytes")
    return f"device: {device}; " + ", ".join(versions)


def report(args, result: Result, *notes: str) -> None:
    """A row printed (with ``notes``) and saved as soon as it is measured."""
    print(result, *notes, flush=True)
    save_json(args.json, result)


def save_json(path: str | None, result: Result) -> None:
    """One JSON line per row as soon as it is measured: a run cut short keeps what it measured."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(result.__dict__) + "\n")


if __name__ == "__main__":
    main()
