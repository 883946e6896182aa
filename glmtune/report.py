"""What a run shows its user besides the metrics: readable logs off a terminal, the loss curve as an image, and
at the end of training where everything went and how to evaluate it."""

import json
import logging
import os
import re
import shlex
import sys

from transformers import TrainerCallback

from glmtune import lora, ptuning

LOSS_CURVE = "loss_curve.png"
LOSS_POINTS = "loss_curve.json"  # the plotted points, for anyone who wants the numbers
CURVE_SIZE = (8, 4.5)  # inches, at CURVE_DPI: 800 x 450 pixels
CURVE_DPI = 100
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet_progress_bars() -> bool:
    """Off a terminal, each progress bar of datasets and transformers (generating splits, tokenizing, loading
    weights) becomes one line of carriage returns thousands of characters long: turn them off there.
    Returns whether they were turned off (Trainer's own bar is its ``--disable_tqdm``)."""
    if sys.stderr.isatty():
        return False
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    return True


class LossCurve(TrainerCallback):
    """Draws the loss curve into --output_dir at every checkpoint and at the end of training (main process)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_loss_curve(state.log_history, args.output_dir)

    def on_train_end(self, args, state, control, **kwargs):
        self.on_save(args, state, control)


def loss_points(log_history: list) -> dict:
    """(step, loss) of every logged training step, and (step, eval_loss) of every evaluation."""
    return {
        "train": [[entry["step"], entry["loss"]] for entry in log_history if "loss" in entry],
        "eval": [[entry["step"], entry["eval_loss"]] for entry in log_history if "eval_loss" in entry],
    }


def write_loss_curve(log_history: list, folder: str) -> None:
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its INFO lines (building a font cache) are noise
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no display: a PNG file, on any machine
    from matplotlib.figure import Figure

    points = loss_points(log_history)
    figure = Figure(figsize=CURVE_SIZE, dpi=CURVE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for name, style in (("train", "-"), ("eval", "o--")):
        if points[name]:
            steps, losses = zip(*points[name])
            axes.plot(steps, losses, style, label=f"{name} loss")
    axes.set(xlabel="step", ylabel="loss", title=os.path.basename(os.path.abspath(folder)))
    axes.grid(alpha=0.3)
    if points["train"] or points["eval"]:
        axes.legend()
    os.makedirs(folder, exist_ok=True)
    figure.savefig(os.path.join(folder, LOSS_CURVE))
    with open(os.path.join(folder, LOSS_POINTS), "w", encoding="utf-8") as f:
        json.dump(points, f)


def training_summary(config) -> str:
    """Where a finished training run put everything, and the command that evaluates it."""
    out = _shown(config.training.output_dir)
    runs = os.path.join(out, "runs")
    rows = [
        ("final weights", _final_weights(out, config.method)),
        ("checkpoints", _checkpoints(out)),
        ("results", os.path.join(out, "train_results.json")),
        ("logs", f"{runs}  (tensorboard --logdir {shlex.quote(runs)})" if os.path.isdir(runs) else None),
        ("loss curve", os.path.join(out, LOSS_CURVE)),
    ]
    lines = [f"Training done: everything is in {out}"]
    lines += [f"  {what:<15}{where}" for what, where in rows if where]
    lines += ["Evaluate it (COMPARE_BASE=1 also scores the untuned base, side by side):"]
    lines += [f"  {evaluate_command(config)}"]
    return "\n".join(lines)


def _final_weights(out: str, method: str) -> str:
    if method == "finetune":
        return f"{out}  (a model folder: use it as MODEL / --model_name_or_path)"
    return os.path.join(out, (ptuning if method == "ptuning" else lora).WEIGHTS_FILE)


def _checkpoints(out: str) -> str | None:
    steps = sorted(int(match[1]) for name in os.listdir(out) if (match := re.fullmatch(r"checkpoint-(\d+)", name)))
    if not steps:
        return None
    listed = steps if len(steps) <= 4 else [*steps[:2], "...", steps[-1]]
    return os.path.join(out, "checkpoint-N") + f"  (N = {', '.join(map(str, listed))})"


def evaluate_command(config) -> str:
    """The evaluate.sh command, run from the same folder, that evaluates what this run trained as it was trained."""
    data, model = config.data, config.model
    variables = {  # None: left out (evaluate.sh's defaults for the columns are main.py's)
        "MODEL": _shown(model.model_name_or_path),
        "CHECKPOINT": _shown(config.training.output_dir),
        "TEST_FILE": data.validation_file and _shown(data.validation_file),
        "QUANTIZATION_BIT": model.quantization_bit,
        "PROMPT_COLUMN": data.prompt_column if data.prompt_column != "content" else None,
        "RESPONSE_COLUMN": data.response_column if data.response_column != "summary" else None,
        "HISTORY_COLUMN": data.history_column,
        "MAX_SOURCE_LENGTH": data.max_source_length,
        "MAX_TARGET_LENGTH": data.max_target_length,
    }
    words = [f"{name}={shlex.quote(str(value))}" for name, value in variables.items() if value is not None]
    words += ["bash", shlex.quote(_shown(os.path.join(REPO, config.method, "evaluate.sh")))]
    if data.prompt_template != "auto":
        words += ["--prompt_template", data.prompt_template]
    if data.source_prefix:
        words += ["--source_prefix", shlex.quote(data.source_prefix)]
    return " ".join(words)


def _shown(path: str) -> str:
    """A path as the user can type it from the current folder: relative when inside it, else as it was given."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
