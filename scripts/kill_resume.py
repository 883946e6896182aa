"""Kill training with SIGKILL at random moments, resume with --resume_from_checkpoint last, compare weights.

    python scripts/kill_resume.py --kills 10 --method both

Each method trains the real entry point (ptuning/main.py, lora/main.py, finetune/main.py) on the toy data,
12 steps with a checkpoint every 2. Every other kill lands while a checkpoint is being written (a
tmp-checkpoint-* folder exists), the others a random 0-0.6 s after the run saved a new checkpoint. After each
kill the run restarts from the newest checkpoint-N (or from scratch when there is none) until it completes; its
final trainable weights are then compared with those of an uninterrupted run with the same seed and flags. A run
that completes before all kills were spent ends the trial early (the table says how many kills happened).
"""

import argparse
import contextlib
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY_TRAIN = REPO / "data" / "adgen-toy" / "train.json"
MAX_STEPS, SAVE_STEPS = 12, 2
METHOD_FLAGS = {
    "ptuning": ["--pre_seq_len", "4", "--learning_rate", "1e-2"],
    "lora": ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2"],
    "finetune": ["--learning_rate", "1e-3"],
}
WEIGHTS = {
    "ptuning": "prefix_encoder.safetensors",
    "lora": "adapter_model.safetensors",
    "finetune": "model.safetensors",
}
THREADS = min(2, os.cpu_count() or 1)  # the same in every run: CPU kernels may split work by thread count
CHECKPOINT_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


def command(method: str, model_dir, output_dir, seed: int) -> list:
    return [
        sys.executable,
        str(REPO / method / "main.py"),
        "--do_train",
        "--train_file",
        str(TOY_TRAIN),
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(output_dir),
        "--max_source_length",
        "32",
        "--max_target_length",
        "16",
        "--max_train_samples",
        "48",
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        str(MAX_STEPS),
        "--save_steps",
        str(SAVE_STEPS),
        "--dataloader_num_workers",
        "0",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--seed",
        str(seed),
        *METHOD_FLAGS[method],
    ]


def checkpoints(output_dir) -> list:
    """Step numbers of the complete checkpoint-N folders (what get_last_checkpoint chooses from)."""
    return sorted(int(p.name.split("-")[1]) for p in Path(output_dir).glob("checkpoint-*") if p.name[11:].isdigit())


def staging(output_dir) -> set:
    """The tmp-checkpoint-* folders, each as (path, creation time): a leftover is told from a new save."""
    found = set()
    for path in glob.glob(os.path.join(output_dir, "tmp-checkpoint-*")):
        with contextlib.suppress(FileNotFoundError):
            found.add((path, os.stat(path).st_ctime_ns))
    return found


def _start(cmd, log_path):
    log = open(log_path, "ab")
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return proc


def _wait_for_kill_moment(proc, output_dir, leftovers: set, during_save: bool, delay: float) -> bool:
    """Poll until the moment to kill; False when the process ended first."""
    start, progressed_at = (checkpoints(output_dir) or [0])[-1], None
    while proc.poll() is None:
        saving = bool(staging(output_dir) - leftovers)  # a save of this process under way
        if during_save and saving:
            return True
        if not during_save:
            if progressed_at is None and (checkpoints(output_dir) or [0])[-1] > start:
                progressed_at = time.monotonic()  # a new checkpoint: the next restart resumes past `start`
            if progressed_at is not None and time.monotonic() - progressed_at >= delay:
                return True
        time.sleep(0.002)
    return False


def run_with_kills(method: str, model_dir, output_dir, kills: int, seed: int = 7, log_path=None) -> dict:
    """Train, SIGKILL `kills` times, resume after each until the run completes. Returns what happened."""
    rng = random.Random(seed)
    output_dir = Path(output_dir)
    log_path = log_path or str(output_dir) + ".log"
    cmd = command(method, model_dir, output_dir, seed)
    killed = during_save = restarts = 0
    resumed_from = []
    while True:
        resume = output_dir.is_dir() and checkpoints(output_dir)
        resumed_from.append(checkpoints(output_dir)[-1] if resume else 0)
        leftovers = staging(output_dir)  # from the previous kill: the new run deletes them at its first save
        proc = _start(cmd + (["--resume_from_checkpoint", "last"] if resume else ["--overwrite_output_dir"]), log_path)
        if killed < kills:
            save_kill = killed % 2 == 0  # the first kill, and every other one, while a checkpoint is written
            if _wait_for_kill_moment(proc, output_dir, leftovers, save_kill, rng.uniform(0.0, 0.6)):
                proc.kill()  # SIGKILL: no handler, no cleanup
                proc.wait()
                killed += 1
                during_save += bool(staging(output_dir) - leftovers)  # the tmp folder it was writing is still there
                restarts += 1
                continue
        if proc.wait() != 0:
            raise RuntimeError(f"{method} run failed (exit {proc.returncode}); log: {log_path}")
        return {"kills": killed, "kills_during_save": during_save, "restarts": restarts, "resumed_from": resumed_from}


def compare_weights(method: str, a, b) -> tuple:
    """(bitwise equal, max abs difference) of the trained weights in two output folders."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(Path(a) / WEIGHTS[method])), load_file(str(Path(b) / WEIGHTS[method]))
    assert wa.keys() == wb.keys(), (sorted(wa), sorted(wb))
    equal = all(wa[k].dtype == wb[k].dtype and bool((wa[k] == wb[k]).all()) for k in wa)
    diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    return equal, diff


def check_output(output_dir) -> dict:
    """What a completed (resumed) run must leave: steps 1..12 logged, no temporary folder, complete checkpoints."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    logged = sorted({e["step"] for e in state["log_history"] if "loss" in e})
    assert state["global_step"] == MAX_STEPS, state["global_step"]
    assert logged == list(range(1, MAX_STEPS + 1)), logged
    assert not staging(output_dir), staging(output_dir)
    for step in checkpoints(output_dir):
        files = {p.name for p in (Path(output_dir) / f"checkpoint-{step}").iterdir()}
        assert CHECKPOINT_FILES <= files, (step, files)
    return state


def run_uninterrupted(method: str, model_dir, output_dir, seed: int = 7) -> None:
    """The reference run, in this process (no second import of torch): the same flags and thread count."""
    import torch

    from glmtune.cli import main

    torch.set_num_threads(THREADS)
    main(method, command(method, model_dir, output_dir, seed)[2:])


def trial(method: str, model_dir, workdir, kills: int, seed: int = 7) -> dict:
    """The killed-and-resumed run of one method, then the uninterrupted one; their weights compared."""
    workdir, started = Path(workdir), time.monotonic()
    killed = workdir / f"{method}-killed"
    result = run_with_kills(method, model_dir, killed, kills, seed, str(killed) + ".log")
    check_output(killed)
    run_uninterrupted(method, model_dir, workdir / f"{method}-full", seed)
    equal, diff = compare_weights(method, workdir / f"{method}-full", killed)
    return {**result, "method": method, "equal": equal, "max_abs_diff": diff, "wall_s": time.monotonic() - started}


def main(argv=None) -> int:
    global MAX_STEPS  # read by command() and check_output(); the tests keep the default of 12
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument(
        "--steps",
        type=int,
        default=MAX_STEPS,
        help="training steps (checkpoint every 2); each timed kill waits for a new checkpoint, "
        "so 10 kills need about 24 steps",
    )
    parser.add_argument("--method", choices=["ptuning", "lora", "finetune", "both"], default="both")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model_name_or_path", help="default: a freshly built tiny GLM (random weights)")
    parser.add_argument("--workdir", help="default: a new temporary folder")
    args = parser.parse_args(argv)
    MAX_STEPS = args.steps
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kill-resume-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_name_or_path
    if model_dir is None:
        import build_tiny_model as tiny  # beside this script

        model_dir = str(workdir / "tiny-glm")
        tiny.build(str(TOY_TRAIN), model_dir, steps=0, num_hidden_layers=2)
    methods = ["ptuning", "lora"] if args.method == "both" else [args.method]
    rows = [trial(m, model_dir, workdir, args.kills, args.seed) for m in methods]
    print(f"\n{'method':8} {'kills':>5} {'in save':>7} {'restarts':>8} {'equal':>6} {'max abs diff':>12} {'wall s':>7}")
    for r in rows:
        print(
            f"{r['method']:8} {r['kills']:>5} {r['kills_during_save']:>7} {r['restarts']:>8} "
            f"{str(r['equal']):>6} {r['max_abs_diff']:>12.3g} {r['wall_s']:>7.1f}"
        )
        print(f"         resumed from steps: {r['resumed_from']}")
    print(f"(logs and outputs in {workdir})")
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
