"""The recipe section of scripts/benchmark.py: the ancestors' recipe as users run it, on one GPU, within budgets.

    python scripts/benchmark.py --rows recipe                      # all rows below (H200: see docs/benchmarks.md)
    python scripts/benchmark.py --rows recipe --precisions nf4 --budgets 6 --recipe_methods ptuning

Every glmtune row runs train.sh's path (glmtune.parsing, then glmtune.workflow: data, base, method, fast path,
memory plan, FastStepTrainer) with train.sh's settings for the recipe: a ChatGLM3-6B-shaped folder read by
glmtune's ChatGLM2/3 class (random weights), the real chatglm3 tokenizer, real AdvertiseGen rows, 64 + 64 tokens,
pre_seq_len 128 (P-Tuning v2) or rank 8 on every linear layer (LoRA), BATCH_SIZE=1 x GRAD_ACCUM=16 (the
effective batch glmtune splits as it sees fit). A budget is a smaller card: torch.cuda.set_per_process_memory_fraction
caps what the process may reserve, and --max_memory_gib tells glmtune. The base is loaded once per method and
precision and serves its budgets (loading is not what is measured). A budget nothing fits in is a row with the
error glmtune gave. The naive rows: transformers + PEFT as a user writes them (benchmark.run_naive), at 1 x 16,
on the same tokenized samples padded to 64 + 65, on the transformers-native GLM folder of the same shape (PEFT's
prefix tuning does not run on the original ChatGLM code's multi-query attention).
"""

import copy
import gc
import logging
import math
import os
import shutil
from dataclasses import dataclass

import benchmark
import torch

from glmtune import chatglm
from glmtune.errors import GlmtuneError
from glmtune.parsing import parse_args
from glmtune.speed.memory import check_before_loading
from glmtune.workflow import build_model, prepare_data, run_tasks

EFFECTIVE_BATCH = 16
RECIPE_STEPS = 3000
METHOD_FLAGS = {
    "ptuning": ["--pre_seq_len", "128", "--learning_rate", "2e-2"],
    "lora": ["--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0.1", "--lora_target", "all",
             "--learning_rate", "5e-3"],
}  # fmt: skip
BITS = {"nf4": 4, "int8": 8, "bf16": None}
NAIVE_SETTING = dict(batch=1, source=(64, 64), target=(65, 65), checkpointing=True)  # answer + eos: 65


def ensure_chatglm3_folder(folder: str, tokenizer_dir: str, tiny: bool, num_layers: int | None = None) -> None:
    """A ChatGLM3-6B-shaped folder as THUDM ships it (original config keys and weight names), random bf16
    weights, the real chatglm3 tokenizer files (``num_layers``: another depth than 28, or 2 when tiny)."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    from glmtune.chatglm.modeling_v2 import ChatGLM2Config, ChatGLM2ForCausalLM

    shape = (
        dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, kv_channels=32, num_attention_heads=4) if tiny else {}
    )
    if num_layers is not None:
        shape["num_layers"] = num_layers
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = ChatGLM2ForCausalLM(ChatGLM2Config(seq_length=8192, **shape)).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(folder, name))
    assert chatglm.is_chatglm_folder(folder)


def recipe_argv(method: str, folder: str, train_file: str, output_dir: str, bits, budget, args) -> list:
    """train.sh's flags for the recipe (ptuning/train.sh, lora/train.sh), steps cut to the measurement."""
    argv = [
        "--do_train", "--model_name_or_path", folder, "--train_file", train_file,
        "--prompt_column", "content", "--response_column", "summary",
        "--max_source_length", "64", "--max_target_length", "64",
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(EFFECTIVE_BATCH),
        "--max_steps", str(args.warmup + args.steps), "--logging_steps", str(args.warmup + args.steps),
        "--save_strategy", "no", "--output_dir", output_dir, "--overwrite_output_dir", "--report_to", "none",
        "--max_train_samples", str((args.warmup + args.steps) * EFFECTIVE_BATCH), "--disable_tqdm", "True",
        *METHOD_FLAGS[method],
    ]  # fmt: skip
    if bits:
        argv += ["--quantization_bit", str(bits)]
    if budget is not None:
        argv += ["--max_memory_gib", str(budget)]
    if args.compile_layers is not None:  # else train.sh's default
        argv += ["--compile_layers", str(args.compile_layers)]
    return argv


def glmtune_rows(folder: str, train_file: str, method: str, precision: str, budgets: list, args) -> list:
    """One base load, one row per budget."""
    bits = BITS[precision]
    template = parse_args(method, recipe_argv(method, folder, train_file, args.scratch, bits, None, args))
    tokenizer, prompt_format, datasets = prepare_data(template)
    model = build_model(template, len(tokenizer))
    rows = []
    for budget in budgets:
        config = copy.deepcopy(template)
        config.run.max_memory_gib = budget if torch.cuda.is_available() else None
        rows.append(_budget_row(config, model, tokenizer, prompt_format, datasets, method, precision, budget, args))
        benchmark.save_json(args.json, rows[-1])
        print(rows[-1], flush=True)
    del model
    benchmark.free_memory()
    return rows


def _budget_row(config, model, tokenizer, prompt_format, datasets, method, precision, budget, args):
    name = f"recipe-{method}-{precision}-{budget}gib"
    timer = benchmark.StepTimer(args.warmup, args.steps)
    cap_memory(budget)
    try:
        check_before_loading(config)  # as a run with this budget would, before its base is loaded
        metrics = run_tasks(config, model, tokenizer, prompt_format, datasets, callbacks=[timer])
    except (GlmtuneError, torch.OutOfMemoryError) as error:
        return RecipeRow(name, "glmtune", precision, budget, error=str(error).splitlines()[0][:160])
    finally:
        cap_memory(None)
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None  # compiled layers are kept for the next budget
    samples_per_s = args.steps * EFFECTIVE_BATCH / (timer.end - timer.start)
    plan = f"{config.training.per_device_train_batch_size} x {config.training.gradient_accumulation_steps}"
    if config.training.gradient_checkpointing:
        plan += f", ckpt every {config.training.gradient_checkpointing_kwargs.get('every_n_layers', 1)}"
    peak = metrics.get("train_peak_gpu_reserved_gib")
    return RecipeRow(name, "glmtune", precision, budget, samples_per_s, peak, plan, metrics.get("train_loss"))


def cap_memory(budget) -> None:
    """A card of ``budget`` GiB (None: the whole card)."""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if budget is None else min(1.0, budget * 2**30 / total))


@dataclass
class RecipeRow:
    row: str
    impl: str
    precision: str
    budget: float | None
    samples_per_s: float = 0.0
    peak_gib: float | None = None  # reserved: what a smaller card must hold
    plan: str = ""  # micro-batch x accumulation, checkpointing
    loss: float | None = None
    error: str = ""  # what glmtune said when nothing fitted


def naive_row(glm_folder: str, samples: list, method: str, precision: str, args) -> RecipeRow:
    """The naive path at 1 x 16: one step warms up, one is timed (16 micro-batches; eager code, nothing to
    compile, so more steps would add minutes to the section and nothing to the figure). Its peak is what the
    allocator reserved, as for glmtune's rows: what a card must hold."""
    timing = copy.copy(args)
    timing.warmup, timing.steps = 1, 1
    result = benchmark.run_naive(
        glm_folder, f"recipe-{method}-{precision}-naive", method, BITS[precision], NAIVE_SETTING, timing,
        samples=samples, accumulation=EFFECTIVE_BATCH,
    )  # fmt: skip
    peak = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None  # since run_naive's reset
    row = RecipeRow(result.row, "naive", precision, None, result.samples_per_s, peak, "1 x 16", result.loss)
    benchmark.save_json(args.json, row)
    print(row, flush=True)
    benchmark.free_memory()
    return row


def print_table(rows: list) -> None:
    naive = {(r.row.rsplit("-", 2)[0] + "-" + r.precision): r for r in rows if r.impl == "naive"}
    print(
        "\n| method | precision | budget GiB | micro-batch x accumulation, checkpointing | samples/s | peak GiB "
        "| 3000 steps (h) | vs naive (speed, memory) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        method = r.row.split("-")[1]
        if r.error:
            print(f"| {method} | {r.precision} | {r.budget} | does not fit: {r.error} |  |  |  |  |")
            continue
        hours = RECIPE_STEPS * EFFECTIVE_BATCH / r.samples_per_s / 3600
        base = naive.get(f"recipe-{method}-{r.precision}") if r.impl == "glmtune" else None
        ratio = f"{r.samples_per_s / base.samples_per_s:.1f}x" if base else ""
        if base and r.peak_gib and base.peak_gib:
            ratio += f", {r.peak_gib / base.peak_gib:.2f}x"
        budget = "naive" if r.impl == "naive" else r.budget
        peak = f"{r.peak_gib:.2f}" if r.peak_gib else ""
        figures = f"{r.samples_per_s:.1f} | {peak} | {hours:.2f} | {ratio}"
        print(f"| {method} | {r.precision} | {budget} | {r.plan} | {figures} |")


def run(args, shared: str) -> list:
    """Every row asked for: per method and precision the naive row, then glmtune's budgets; the table last."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("glmtune").setLevel(logging.INFO)  # the memory plans and their probes, in the log
    tokenizer_dir = os.path.join(shared, "tokenizers", "chatglm3-6b")
    train_file = os.path.join(shared, "data", "AdvertiseGen", "train.json")
    chatglm_dir = args.model.rstrip("/") + "-chatglm3"
    ensure_chatglm3_folder(chatglm_dir, tokenizer_dir, args.tiny)
    glm_dir = args.model
    if args.tiny:  # the naive rows read the chatglm3 tokenizer's ids: the tiny GLM needs its vocabulary size
        glm_dir = args.model.rstrip("/") + "-vocab65024"
    benchmark.ensure_model(glm_dir, {**benchmark.TINY, "vocab_size": 65024} if args.tiny else benchmark.CHATGLM3_6B)
    rows = []
    for precision in args.precisions.split(","):
        if BITS[precision] and not torch.cuda.is_available():
            continue
        for method in args.recipe_methods.split(","):
            samples = _tokenized(chatglm_dir, train_file, method, args)
            naive = naive_row(glm_dir, samples, method, precision, args)  # first: its peak may be a budget
            rows += glmtune_rows(chatglm_dir, train_file, method, precision, budgets(args.budgets, naive), args)
            rows.append(naive)
    print_table(rows)
    return rows


def budgets(spec: str, naive) -> list:
    """--budgets in GiB; "naive" is the naive row's peak, rounded down to 0.01 GiB (left out where not measured)."""
    values = []
    for item in spec.split(","):
        if item != "naive":
            values.append(float(item))
        elif naive.peak_gib:
            values.append(math.floor(naive.peak_gib * 100) / 100)
    return values


def _tokenized(folder: str, train_file: str, method: str, args) -> list:
    """The samples glmtune trained on (same tokenizer, prompt format and truncation), for the naive rows."""
    config = parse_args(method, recipe_argv(method, folder, train_file, args.scratch, None, None, args))
    _, _, datasets = prepare_data(config)
    return [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in datasets["train"]]
