"""Full fine-tuning of a ChatGLM3-6B-shaped model on one GPU: samples/s, peak GPU memory, peak host memory.

    pip install -r requirements-deepspeed.txt    # DeepSpeed, for the ZeRO rows
    # ZeRO-3, parameters and optimizer offloaded to the CPU (torch's AdamW on the CPU): one process, either launcher
    torchrun --standalone --nproc_per_node 1 scripts/benchmark_finetune.py --json ft.json
    deepspeed --num_gpus 1 scripts/benchmark_finetune.py --json ft.json
    # no DeepSpeed: float32 weights, bf16 compute, bitsandbytes' 8-bit AdamW on the GPU
    python scripts/benchmark_finetune.py --deepspeed none --optim paged_adamw_8bit --json ft.json
    python scripts/benchmark_finetune.py --tiny --deepspeed none   # a 2-layer model, to check this script (CPU works)

One configuration per process (DeepSpeed's config is process-wide); each run appends its row to --json and prints
the table of every row in that file, so runs one after another make one table. What runs is train.sh's path:
glmtune.parsing with finetune/train.sh's flags, then the workflow's data, model and trainer (FastStepTrainer), on
a ChatGLM3-6B-shaped folder read by glmtune's ChatGLM2/3 class (random bf16 weights, built on first use), the real
chatglm3 tokenizer and real AdvertiseGen rows: ChatGLM-6B's full fine-tuning recipe (64 + 64 tokens, 4 samples per
step, learning rate 1e-4), bf16 mixed precision, every layer checkpointed. --warmup steps, then --steps timed ones
(samples/s over those). Peak GPU memory is torch's over the training steps; peak host memory is the process's peak
resident set (pinned offload buffers included). --save also saves the model folder at the end (under ZeRO-3 it is
gathered from the shards) and checks that it holds every parameter.

The same run through the shell script, on the folder this script builds (--build_only builds it and stops):

    MODEL=/tmp/glmtune-bench/chatglm3-6b-ft TRAIN_FILE=../shared/data/AdvertiseGen/train.json
    DEEPSPEED=scripts/deepspeed/zero3_offload.json BATCH_SIZE=4 LR=1e-4 GRADIENT_CHECKPOINTING=1 MAX_STEPS=4
    SAVE_STEPS=1000 bash finetune/train.sh

Host memory to expect: with the optimizer offloaded, the host holds the float32 master weights, gradients and
AdamW's two moments, 16 bytes per parameter, plus 2 for offloaded bf16 weights; measured (2026-12-03, H200 host
with 125 GiB, docs/benchmarks.md run 18) the peak was about 27 bytes per parameter: 85.2 GiB at 14 layers (3.39B),
and the 28-layer 6.24B run was killed for host memory. --num_layers makes a shallower model where the host has less.
"""

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


@dataclass
class Row:
    deepspeed: str
    optim: str
    dtype: str  # the trained weights' (--torch_dtype, as glmtune resolved it)
    parameters_b: float
    layers: int
    batch: str  # micro-batch x accumulation
    samples_per_s: float
    peak_gpu_gib: float | None  # allocated by torch
    peak_gpu_reserved_gib: float | None  # reserved from the card: what a smaller card must hold
    peak_host_gib: float
    loss: float
    save_s: float | None = None
    saved_parameters_b: float | None = None


def main() -> None:
    args = parse_cli()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit("error: one process on one GPU: --nproc_per_node 1 / --num_gpus 1")
    import benchmark  # beside this script

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("glmtune").setLevel(logging.INFO)  # loading, the trainable parameters, DeepSpeed's setup
    print(benchmark.environment(), flush=True)
    folder = build_folder(args)
    if args.build_only:
        print(f"model folder: {folder}")
        return
    from glmtune.errors import GlmtuneError, exit_with

    try:
        row = run(args, folder)
    except GlmtuneError as error:  # a refused configuration: its error lines, exit status 2
        exit_with(error)
    finally:
        if torch.distributed.is_initialized():  # torchrun / deepspeed: before the interpreter exits (glmtune.cli)
            torch.distributed.destroy_process_group()
    benchmark.save_json(args.json, row)
    print_table(read_rows(args.json) if args.json else [asdict(row)])


def parse_cli():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/glmtune-bench/chatglm3-6b-ft", help="model folder (built if missing)")
    parser.add_argument("--scratch", default="/tmp/glmtune-bench/scratch-ft", help="the run's --output_dir")
    parser.add_argument("--shared", default=os.path.join(REPO, "..", "shared"), help="tokenizer and AdvertiseGen rows")
    parser.add_argument(
        "--deepspeed", default="scripts/deepspeed/zero3_offload.json", help="a DeepSpeed config, or none"
    )
    parser.add_argument("--optim", default="adamw_torch", help="transformers' --optim (paged_adamw_8bit: 8-bit)")
    parser.add_argument("--torch_dtype", default="auto", help="glmtune's --torch_dtype (bfloat16: pure bf16 weights)")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch (per_device_train_batch_size)")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before the timed ones")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--num_layers", type=int, default=None, help="decoder layers (default 28; 2 with --tiny)")
    parser.add_argument("--save", action="store_true", help="also save the model folder at the end, timed")
    parser.add_argument("--build_only", action="store_true", help="build the model folder and stop")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, to check this script (CPU works)")
    parser.add_argument("--json", default=None, help="append the row here; the table shows every row in the file")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return parser.parse_args()


def build_folder(args) -> str:
    """The model folder, built on first use in a process of its own: building holds the whole model on the GPU and,
    while saving, in host memory, which is not what the run's peaks are to measure."""
    tokenizer_dir = os.path.join(args.shared, "tokenizers", "chatglm3-6b")
    if not os.path.isdir(tokenizer_dir):
        sys.exit(f"error: {tokenizer_dir} is missing: --shared names the folder with the chatglm3 tokenizer")
    if args.build_only:
        import benchmark_recipe  # beside this script

        benchmark_recipe.ensure_chatglm3_folder(args.model, tokenizer_dir, args.tiny, args.num_layers)
    elif not os.path.isfile(os.path.join(args.model, "config.json")):
        subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--build_only"], check=True)
    return args.model


def finetune_argv(args, folder: str) -> list:
    """finetune/train.sh's flags for ChatGLM-6B's full fine-tuning recipe, steps cut to the measurement."""
    steps = args.warmup + args.steps
    argv = [
        "--do_train", "--model_name_or_path", folder,
        "--train_file", os.path.join(args.shared, "data", "AdvertiseGen", "train.json"),
        "--prompt_column", "content", "--response_column", "summary",
        "--max_source_length", "64", "--max_target_length", "64", "--learning_rate", "1e-4",
        "--per_device_train_batch_size", str(args.batch), "--gradient_accumulation_steps", str(args.accumulation),
        "--gradient_checkpointing", "--optim", args.optim, "--torch_dtype", args.torch_dtype,
        "--max_steps", str(steps), "--logging_steps", str(steps), "--save_strategy", "no",
        "--max_train_samples", str(steps * args.batch * args.accumulation),
        "--output_dir", args.scratch, "--overwrite_output_dir", "--report_to", "none", "--disable_tqdm", "True",
    ]  # fmt: skip
    if args.deepspeed != "none":
        argv += ["--deepspeed", os.path.join(REPO, args.deepspeed)]
    return argv


def run(args, folder: str) -> Row:
    from benchmark import StepTimer

    from glmtune import speed
    from glmtune.parsing import parse_args
    from glmtune.workflow import build_model, build_trainer, prepare_data, training_collator

    config = parse_args("finetune", finetune_argv(args, folder))
    tokenizer, prompt_format, datasets = prepare_data(config)
    model = build_model(config, len(tokenizer))
    trainer = build_trainer(config, model, tokenizer, datasets, prompt_format, training_collator(config, tokenizer))
    timer = StepTimer(args.warmup, args.steps)
    trainer.add_callback(timer)
    speed.memory.reset_peak()
    result = trainer.train()
    peak = speed.memory.peak_metrics("train")
    parameters = stored_parameters(folder)
    row = Row(
        deepspeed=os.path.basename(args.deepspeed),
        optim=args.optim,
        dtype=config.model.torch_dtype,
        parameters_b=round(parameters / 1e9, 4),
        layers=config_layers(folder),
        batch=f"{args.batch} x {args.accumulation}",
        samples_per_s=round(args.steps * args.batch * args.accumulation / (timer.end - timer.start), 3),
        peak_gpu_gib=peak.get("train_peak_gpu_memory_gib"),
        peak_gpu_reserved_gib=peak.get("train_peak_gpu_reserved_gib"),
        peak_host_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        loss=round(result.training_loss, 4),
    )
    if args.save:
        row.save_s, row.saved_parameters_b = save(trainer, args.scratch)
    return row


def save(trainer, folder: str) -> tuple:
    """Seconds to save the model folder (gathered under ZeRO-3), and the parameters it holds (billions)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.save_model(folder)
    seconds = round(time.perf_counter() - start, 1)
    return seconds, round(stored_parameters(folder) / 1e9, 4)


def stored_parameters(folder: str) -> int:
    """Elements in a model folder's safetensors files, read from their headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(folder)):
        if name.startswith("model") and name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def config_layers(folder: str) -> int:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)["num_layers"]


def read_rows(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def print_table(rows: list) -> None:
    print(
        "\n| DeepSpeed config | optimizer | weights | parameters (B) | layers | micro-batch x accumulation | samples/s "
        "| peak GPU GiB (reserved) | peak host RSS GiB | loss | save s | saved parameters (B) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gpu = f"{r['peak_gpu_gib']:.2f} ({r['peak_gpu_reserved_gib']:.2f})" if r["peak_gpu_gib"] is not None else ""
        saved = ["", ""] if r["save_s"] is None else [f"{r['save_s']:.1f}", f"{r['saved_parameters_b']:.3g}"]
        cells = [r["deepspeed"], r["optim"], r["dtype"], f"{r['parameters_b']:.3g}", r["layers"], r["batch"]]
        cells += [f"{r['samples_per_s']:.2f}", gpu, f"{r['peak_host_gib']:.1f}", f"{r['loss']:.4f}", *saved]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
