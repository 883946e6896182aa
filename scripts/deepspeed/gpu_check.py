"""Which DeepSpeed combinations train, on this machine's GPUs: a few steps of each, through the shipped scripts.

    python scripts/deepspeed/gpu_check.py --out /tmp/ds-check [--rows pt-z3,lora-z3] [--nproc 2]

Each row runs ptuning/train.sh or lora/train.sh (NUM_GPUS=--nproc, DEEPSPEED=<config>, QUANTIZATION_BIT=...)
on --model for --steps steps, several rows at once, and the table (markdown, also rows.jsonl) gives its
status, the losses logged at every step and rank 0's peak GPU memory (transformers' memory metrics).
Rows marked "unchecked" bypass glmtune's argument check to show why it refuses that combination; rows
named "*-resume" continue their base row from its middle checkpoint and compare the final weights.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "scripts" / "deepspeed"
# name: (method, DeepSpeed config or None, quantization bits or None, extra flags, unchecked)
ROWS = {
    "pt-plain": ("ptuning", None, None, [], False),
    "lora-plain": ("lora", None, None, [], False),
    "pt-z2": ("ptuning", "zero2", None, [], False),
    "lora-z2": ("lora", "zero2", None, [], False),
    "lora-z2-bf16": ("lora", "zero2", None, ["--bf16"], False),
    "pt-z3": ("ptuning", "zero3", None, ["--do_predict"], False),
    "lora-z3": ("lora", "zero3", None, ["--do_predict"], False),
    "pt-z3-bf16": ("ptuning", "zero3", None, ["--bf16"], False),
    "lora-z3-bf16": ("lora", "zero3", None, ["--bf16"], False),
    "pt-z3-compiled": ("ptuning", "zero3", None, ["--compile_layers", "True"], False),  # refused
    "lora-z3-compiled": ("lora", "zero3", None, ["--compile_layers", "True"], False),  # refused
    "pt-z2-q4": ("ptuning", "zero2", 4, [], False),
    "lora-z2-q4": ("lora", "zero2", 4, [], False),
    "pt-z2-q8": ("ptuning", "zero2", 8, [], False),
    "lora-z2-q8": ("lora", "zero2", 8, [], False),
    "lora-z3-q4": ("lora", "zero3", 4, [], True),  # unchecked: shows why it is refused
    "pt-z3-q8": ("ptuning", "zero3", 8, [], True),
    "pt-z2-offload": ("ptuning", "zero2_offload", None, [], False),
    "lora-z3-offload": ("lora", "zero3_offload", None, [], False),
    "pt-z3-offload": ("ptuning", "zero3_offload", None, [], False),
}
UNCHECKED_MAIN = """import sys
import glmtune.parsing as parsing
parsing._distributed_problems = lambda config: []  # this row shows what the refusal prevents
from glmtune.cli import main
main(sys.argv[1], sys.argv[2:])
"""


def run_row(name: str, args, resume_from: Path | None = None) -> dict:
    method, config, bits, flags, unchecked = ROWS[name.removesuffix("-resume")]
    out = Path(args.out) / name
    shutil.rmtree(out, ignore_errors=True)
    flags = [
        *flags,
        "--max_train_samples",
        str(args.samples),
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--skip_memory_metrics",
        "False",
        "--max_predict_samples",
        "8",
        "--max_new_tokens",
        "8",
    ]
    if "--do_predict" in flags:
        flags += ["--test_file", "data/adgen-toy/dev.json"]
    if resume_from is not None:
        out.mkdir(parents=True)
        shutil.copytree(resume_from, out / resume_from.name)
        flags += ["--resume_from_checkpoint", "last"]
    env = {
        **os.environ,
        "MODEL": args.model,
        "OUTPUT_DIR": str(out),
        "NUM_GPUS": str(args.nproc),
        "DEEPSPEED": str(CONFIGS / f"{config}.json") if config else "",
        "QUANTIZATION_BIT": str(bits or ""),
        "BATCH_SIZE": "4",
        "MAX_STEPS": str(args.steps),
        "SAVE_STEPS": str(args.steps // 2),
        "MAX_SOURCE_LENGTH": "32",
        "MAX_TARGET_LENGTH": "16",
        "LORA_DROPOUT": "0",
    }
    command = ["bash", f"{method}/train.sh", *flags] + (["--prefix_dropout", "0"] if method == "ptuning" else [])
    if unchecked:  # the same run through a main.py that skips the DeepSpeed check
        Path(args.out, "unchecked_main.py").write_text(UNCHECKED_MAIN)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        command = _unchecked_command(method, env, flags, Path(args.out, "unchecked_main.py"))
    start = time.time()
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
        status, log = ("ok" if result.returncode == 0 else f"exit {result.returncode}"), result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        status, log = (
            "timeout",
            (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(errors="replace"),
        )
    row = {"row": name, "status": status, "seconds": round(time.time() - start), **_results(out)}
    if status != "ok":
        row["error"] = _error_lines(log)
    return row


def _unchecked_command(method, env, flags, main_py) -> list:
    """What train.sh would start, with the unchecked main (the script's flags rebuilt from its variables)."""
    script_flags = [
        "--do_train",
        "--model_name_or_path",
        env["MODEL"],
        "--train_file",
        "data/adgen-toy/train.json",
        "--max_source_length",
        "32",
        "--max_target_length",
        "16",
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        env["MAX_STEPS"],
        "--save_steps",
        env["SAVE_STEPS"],
        "--output_dir",
        env["OUTPUT_DIR"],
        "--overwrite_output_dir",
        "--deepspeed",
        env["DEEPSPEED"],
    ]
    script_flags += ["--quantization_bit", env["QUANTIZATION_BIT"]] if env["QUANTIZATION_BIT"] else []
    script_flags += (
        ["--pre_seq_len", "32", "--learning_rate", "2e-2", "--prefix_dropout", "0"]
        if method == "ptuning"
        else ["--learning_rate", "5e-3", "--lora_dropout", "0"]
    )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        env["NUM_GPUS"],
        str(main_py),
        method,
        *script_flags,
        *flags,
    ]


def _results(out: Path) -> dict:
    state = out / "trainer_state.json"
    if not state.is_file():
        return {}
    history = json.loads(state.read_text())["log_history"]
    train = json.loads((out / "train_results.json").read_text())
    peak = sum(
        train.get(key, 0)
        for key in (
            "before_init_mem_gpu",
            "init_mem_gpu_alloc_delta",
            "train_mem_gpu_alloc_delta",
            "train_mem_gpu_peaked_delta",
        )
    )
    results = {
        "losses": [round(entry["loss"], 4) for entry in history if "loss" in entry],
        "peak_gib": round(peak / 2**30, 3),
        "files": sorted(p.name for p in out.iterdir()),
    }
    predictions = out / "generated_predictions.txt"
    if predictions.is_file():
        results["predictions"] = len(predictions.read_text(encoding="utf-8").splitlines())
    return results


def _error_lines(log: str) -> list:
    lines = [line for line in log.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    errors = [line for line in lines if "Error" in line or line.startswith("error:")]
    return (errors or lines)[-6:]


def resume_row(name: str, args) -> dict:
    base = Path(args.out) / name.removesuffix("-resume")
    row = run_row(name, args, resume_from=base / f"checkpoint-{args.steps // 2}")
    row["max_abs_diff_vs_uninterrupted"] = weights_equal(base, Path(args.out) / name)
    return row


def weights_equal(a: Path, b: Path) -> float | None:
    from safetensors.torch import load_file

    for name in ("prefix_encoder.safetensors", "adapter_model.safetensors"):
        if (a / name).is_file() and (b / name).is_file():
            left, right = load_file(str(a / name)), load_file(str(b / name))
            return max(float((left[key].float() - right[key].float()).abs().max()) for key in left)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="models/tiny-glm")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated row names; add NAME-resume to resume NAME"
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=8, help="rows run at once")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per row")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    names = args.rows.split(",")
    first = [name for name in names if not name.endswith("-resume")]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda name: run_row(name, args), first))
    with ThreadPoolExecutor(args.parallel) as pool:  # then the resumed runs, from their base rows' checkpoints
        rows += list(
            pool.map(lambda name: resume_row(name, args), [name for name in names if name.endswith("-resume")])
        )
    with open(Path(args.out) / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("| row | status | s | peak GiB (rank 0) | losses | resumed: max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['row']} | {row['status']} | {row['seconds']} | {row.get('peak_gib', '')} "
            f"| {row.get('losses', '')} "
            f"| {row.get('max_abs_diff_vs_uninterrupted', '')} |"
        )
    for row in rows:
        if "error" in row:
            print(f"\n{row['row']}:\n  " + "\n  ".join(row["error"]))


if __name__ == "__main__":
    main()
