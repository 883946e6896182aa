"""Fitting a run into a memory budget (glmtune.speed.memory): the plan it chooses, and that the choice does not
change the training math."""

import pytest
import torch
from conftest import REPO, TOY_TRAIN, tiny
from safetensors.torch import load_file
from test_trainer import argv, run

FLAGS = {
    "ptuning": ["--pre_seq_len", "4", "--prefix_dropout", "0", "--learning_rate", "1e-2"],
    "lora": ["--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--learning_rate", "1e-2"],
}
WEIGHTS = {"ptuning": "prefix_encoder.safetensors", "lora": "adapter_model.safetensors"}


def one_step(method, model_dir, out, micro_batch, accumulation, *flags):
    """One optimizer step over the same 8 samples, split as asked; the trained weights."""
    run(
        method, model_dir, out, "--do_train", "--train_file", str(TOY_TRAIN), "--max_steps", "1", "--save_strategy",
        "no", "--per_device_train_batch_size", str(micro_batch), "--gradient_accumulation_steps", str(accumulation),
        "--max_train_samples", "8", "--optim", "sgd", "--max_grad_norm", "0", *FLAGS[method], *flags,
    )  # fmt: skip
    return load_file(str(out / WEIGHTS[method]))


@pytest.mark.parametrize("loss", ["target_token", "transformers"])
@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_one_step_gives_the_same_update_whatever_the_split_and_checkpointing(tiny_model_dir, tmp_path, method, loss):
    """Per target token of the whole effective batch (transformers' num_items_in_batch): 8 x 1, 1 x 8 and 2 x 4
    with every other layer checkpointed train the same weights. SGD without clipping: the update is the gradient."""
    splits = [
        (8, 1, []),
        (1, 8, []),
        (
            2,
            4,
            [
                "--gradient_checkpointing",
                "--gradient_checkpointing_kwargs",
                '{"use_reentrant": false, "every_n_layers": 2}',
            ],
        ),
    ]
    loss_flags = ["--target_token_loss", str(loss == "target_token")]
    results = [
        one_step(method, tiny_model_dir, tmp_path / f"{m}x{a}", m, a, *flags, *loss_flags) for m, a, flags in splits
    ]
    start = one_step(method, tiny_model_dir, tmp_path / "start", 8, 1, "--learning_rate", "0", *loss_flags)
    for name, value in results[0].items():
        assert not torch.equal(value, start[name]) or method == "lora"  # LoRA's A moves only once B is non-zero
        for other in results[1:]:
            torch.testing.assert_close(other[name], value, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(results[0][n], start[n]) for n in start)


# ----------------------------------------------------------------------------- choosing a plan (no GPU needed)

GIB = 2**30


def probes(
    weights=4.0, per_sample_full=0.5, per_sample_checkpointed=0.05, step=0.05, per_sample_time=0.01, recompute=1.5
):
    """What the prober measures on a 28-layer model: memory and time linear in the micro-batch."""
    from glmtune.speed.memory import Probe

    found = []
    for share, slope, time_factor in ((0.0, per_sample_full, 1.0), (1.0, per_sample_checkpointed, recompute)):
        for m in (1, 2, 4):
            found.append(Probe(m, share, (weights + m * slope) * GIB, (step + m * per_sample_time) * time_factor))
    return found


def test_a_large_budget_runs_the_whole_effective_batch_at_once_without_checkpointing():
    from glmtune.speed.memory import choose

    best = choose(probes(), effective_batch=16, num_layers=28, budget_bytes=20 * GIB)[0]
    assert (best.micro_batch, best.accumulation, best.every_n_layers) == (16, 1, None)
    assert best.peak_bytes == pytest.approx((4.0 + 16 * 0.5) * GIB)


def test_a_smaller_budget_checkpoints_just_enough_layers():
    """9 GiB: 16 samples without checkpointing need 12 GiB, with every layer checkpointed 4.8 GiB, with every
    second layer (14 of 28) 8.4 GiB, with every third (10) 9.4 GiB. With a large fixed cost per micro-step (as on
    a 4-bit base, which dequantizes its weights every time), the fastest plan that fits is every second layer."""
    from glmtune.speed.memory import choose

    plans = choose(probes(step=0.2), effective_batch=16, num_layers=28, budget_bytes=9 * GIB)
    best = plans[0]
    assert (best.micro_batch, best.every_n_layers) == (16, 2)
    assert best.peak_bytes == pytest.approx((4.0 + 16 * (0.5 - 0.45 * 14 / 28)) * GIB)
    assert all(plan.peak_bytes <= 9 * GIB for plan in plans)
    assert best.samples_per_s == max(plan.samples_per_s for plan in plans)


def test_noisy_small_probes_never_make_checkpointing_look_faster():
    """The bf16 LoRA probes of 2026-12-03 on an H200 (GiB, seconds): with every layer checkpointed the times at
    micro-batch 2 and 4 came out 0.203 and 0.185, a flat line that predicted 16 x 1 with checkpointing at 79
    samples/s and chose it for a 24 GiB budget where 16 x 1 without fits (measured: 75 samples/s)."""
    from glmtune.speed.memory import Probe, choose

    measured = [(1, 0.0, 12.51, 0.120), (2, 0.0, 13.16, 0.116), (4, 0.0, 14.45, 0.147),
                (1, 1.0, 11.94, 0.195), (2, 1.0, 12.03, 0.203), (4, 1.0, 12.21, 0.185)]  # fmt: skip
    found = [Probe(m, share, peak * GIB, seconds) for m, share, peak, seconds in measured]
    best = choose(found, effective_batch=16, num_layers=28, budget_bytes=24 * 0.95 * GIB)[0]
    assert (best.micro_batch, best.every_n_layers) == (16, None)
    # 13 GiB: without checkpointing only 1 x 16 fits; 8 x 2 with every layer checkpointed is 3x faster
    best = choose(found, effective_batch=16, num_layers=28, budget_bytes=13.0 * GIB)[0]
    assert (best.micro_batch, best.every_n_layers) == (8, 1)


def test_one_probe_without_checkpointing_does_not_hide_what_larger_micro_batches_gain():
    """The compiled nf4 LoRA probes of 2026-12-03 on an H200 limited to 5.34 GiB (GiB, seconds): without
    checkpointing only micro-batch 1 fitted. Its time through the origin made every micro-batch as slow per
    sample, so 1 x 16 (5.1 samples/s predicted, 6.9 measured) was chosen over 8 x 2 with every layer checkpointed
    (29 samples/s measured in the 6 GiB row)."""
    from glmtune.speed.memory import Probe, choose

    measured = [(1, 0.0, 4.80, 0.196), (2, 0.0, None, None), (4, 0.0, None, None),
                (1, 1.0, 4.23, 0.306), (2, 1.0, 4.28, 0.313), (4, 1.0, 4.40, 0.241)]  # fmt: skip
    found = [Probe(m, share, peak and peak * GIB, seconds) for m, share, peak, seconds in measured]
    best = choose(found, effective_batch=16, num_layers=28, budget_bytes=5.34 * 0.95 * GIB)[0]
    assert (best.micro_batch, best.every_n_layers) == (8, 1)


def test_a_small_budget_checkpoints_every_layer():
    from glmtune.speed.memory import choose

    best = choose(probes(), effective_batch=16, num_layers=28, budget_bytes=6 * GIB)[0]
    assert (best.micro_batch, best.every_n_layers) == (16, 1)


def test_checkpointing_set_by_hand_is_kept():
    from glmtune.speed.memory import choose

    off = [p for p in probes() if p.checkpointed == 0.0]
    plans = choose(off, effective_batch=16, num_layers=28, budget_bytes=6 * GIB, every_n_layers=None)
    assert plans and all(plan.every_n_layers is None for plan in plans)
    assert max(plan.micro_batch for plan in plans) == 4  # 4 + 4 x 0.5 = 6 GiB


def test_a_budget_nothing_fits_is_one_error_naming_what_would(tiny_model_dir):
    from glmtune.errors import GlmtuneError
    from glmtune.speed.memory import Probe, fit

    measured = probes()

    class Replay:  # the prober's measurements, replayed: the choice and the error are what is tested
        num_layers = 28

        def __call__(self, micro_batch, every_n_layers, repeats=2):
            share = 0.0 if every_n_layers is None else 1.0
            return (
                next(p for p in measured if p.micro_batch == micro_batch and p.checkpointed == share)
                if micro_batch in (1, 2, 4)
                else Probe(micro_batch, share, None, None)
            )

    with pytest.raises(GlmtuneError) as error:
        fit(Replay(), effective_batch=16, budget_bytes=3 * GIB)
    message = str(error.value)
    assert message.startswith("--max_memory_gib 3: no micro-batch fits")
    assert "needs 4.0 GiB" in message and "\n" not in message


class Recorder:
    """Probes in the order they are asked for; memory as :func:`probes` with 4 GiB of weights, out of memory
    above ``limit_gib``."""

    num_layers = 28

    def __init__(self, limit_gib: float):
        self.limit, self.asked = limit_gib * GIB, []

    def __call__(self, micro_batch, every_n_layers, repeats=2):
        from glmtune.speed.memory import Probe

        self.asked.append((micro_batch, every_n_layers))
        share = 0.0 if every_n_layers is None else 1.0
        slope = 0.5 if every_n_layers is None else 0.05
        peak = (4.0 + micro_batch * slope) * GIB
        seconds = (0.05 + 0.01 * micro_batch) * (1.5 if every_n_layers else 1.0)
        return Probe(micro_batch, share, peak if peak <= self.limit else None, seconds)


def test_probes_start_large_and_leave_out_one_sample_where_two_larger_fit():
    """The first probe compiles the layers for shapes in general; micro-batch 1 would compile its own code."""
    from glmtune.speed.memory import fit

    roomy = Recorder(limit_gib=80)
    plan = fit(roomy, effective_batch=16, budget_bytes=80 * GIB)
    assert roomy.asked[:4] == [(4, None), (2, None), (4, 1), (2, 1)]
    assert all(micro_batch > 1 for micro_batch, _ in roomy.asked)
    assert (plan.micro_batch, plan.every_n_layers) == (16, None)
    tight = Recorder(limit_gib=5.5)  # without checkpointing only micro-batch 2 and 1 fit
    fit(tight, effective_batch=16, budget_bytes=5.5 * GIB)
    assert tight.asked[:5] == [(4, None), (2, None), (1, None), (4, 1), (2, 1)]


def test_train_results_hold_the_peak_memory(tiny_model_dir, tmp_path):
    import json

    run(
        "lora",
        tiny_model_dir,
        tmp_path / "out",
        "--do_train",
        "--train_file",
        str(TOY_TRAIN),
        "--max_steps",
        "2",
        "--save_strategy",
        "no",
        "--max_train_samples",
        "8",
        *FLAGS["lora"],
    )
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    key = "train_peak_gpu_memory_gib" if torch.cuda.is_available() else "train_peak_host_memory_gib"
    assert results[key] > 0.1


@pytest.fixture(scope="module")
def wide_model_and_long_samples(tmp_path_factory):
    """A 2-layer GLM 1024 wide and 64 records of ~500 tokens: 16 of them at once take about 1 GiB of activations,
    far above the fixed part (weights, cuBLAS workspaces), so budgets between the two ask the plan for something.
    The session's tiny model (128 wide) on the short toy records stays near its fixed part whatever the split."""
    import json

    folder = tmp_path_factory.mktemp("wide-glm")
    tiny.build(str(TOY_TRAIN), str(folder), steps=0, num_hidden_layers=2, hidden_size=1024, intermediate_size=4096,
               num_attention_heads=8, num_key_value_heads=4, head_dim=128)  # fmt: skip
    rows = [json.loads(line) for line in TOY_TRAIN.read_text(encoding="utf-8").splitlines()]
    groups = [rows[i : i + 8] for i in range(0, 64 * 8, 8)]
    long_rows = [{"content": "*".join(r["content"] for r in g), "summary": "".join(r["summary"] for r in g)}
                 for g in groups]  # fmt: skip
    data = folder / "long.json"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in long_rows), encoding="utf-8")
    return folder, data


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="memory budgets are GPU memory")
@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_a_run_fits_its_budget_on_the_gpu(wide_model_and_long_samples, tmp_path, method):
    """A budget halfway between the smallest run (micro-batch 1, every layer checkpointed) and 16 long samples at
    once: the plan splits the batch or checkpoints, and the run's measured peak (reserved memory, what a smaller
    card must hold) stays inside the budget. Uncompiled layers, so the six runs take seconds: the plan measures
    whatever the run executes, compiled or not."""
    import json

    model_dir, data = wide_model_and_long_samples
    flags = ["--do_train", "--train_file", str(data), "--max_steps", "2", "--save_strategy", "no",
             "--max_train_samples", "32", "--max_source_length", "256", "--max_target_length", "256",
             "--compile_layers", "False", *FLAGS[method]]  # fmt: skip
    shapes = {"whole": ["16", "1"], "smallest": ["1", "16", "--gradient_checkpointing"]}
    peaks = {}
    for name, (micro_batch, *accumulation) in shapes.items():
        # Each run in its own process: the peak of one is not the next's.
        run_process(method, model_dir, tmp_path / name, *flags, "--per_device_train_batch_size", micro_batch,
                    "--gradient_accumulation_steps", *accumulation, "--fit_memory", "False")  # fmt: skip
        peaks[name] = json.loads((tmp_path / name / "train_results.json").read_text())["train_peak_gpu_reserved_gib"]
    assert peaks["whole"] > 2 * peaks["smallest"], peaks  # else the budget would not ask the plan for anything
    budget = round((peaks["whole"] + peaks["smallest"]) / 2, 3)
    log = run_process(method, model_dir, tmp_path / "out", *flags, "--per_device_train_batch_size", "1",
                      "--gradient_accumulation_steps", "16", "--max_memory_gib", str(budget))  # fmt: skip
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    plan = [line for line in log.splitlines() if "Memory p" in line]  # the probes and the plan, for the message
    assert "Memory plan for" in log, log[-3000:]
    assert results["train_peak_gpu_reserved_gib"] <= budget, (peaks, budget, results, plan)


def run_process(method, model_dir, output_dir, *flags) -> str:
    """The method's entry point in a new Python process; its log."""
    import subprocess
    import sys

    command = [sys.executable, str(REPO / method / "main.py"), *argv(model_dir, output_dir, *flags)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="memory budgets are GPU memory")
def test_a_16_bit_base_is_measured_on_the_gpu(tiny_model_dir, tmp_path):
    """A 16/32-bit base is loaded on the CPU (the Trainer moves it later): the probes must run where it trains,
    so the plan's peak holds at least the weights (2026-12-03: probed on the CPU, every probe 0.00 GiB)."""
    from glmtune import speed
    from glmtune.parsing import parse_args
    from glmtune.workflow import build_model, prepare_data, training_collator

    config = parse_args("lora", ["--do_train", "--train_file", str(TOY_TRAIN), "--model_name_or_path",
                                 str(tiny_model_dir), "--output_dir", str(tmp_path / "out"), "--torch_dtype",
                                 "float32", "--max_train_samples", "16", "--max_memory_gib", "4"])  # fmt: skip
    tokenizer, prompt_format, datasets = prepare_data(config)
    model = build_model(config, len(tokenizer))
    assert model.device.type == "cpu"
    plan = speed.fit_memory(config, model, datasets["train"], training_collator(config, tokenizer))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model.device.type == "cuda"
    assert plan.peak_bytes >= weights


def test_a_budget_below_the_weights_is_refused_before_loading(tiny_model_dir, tmp_path):
    """The weight files say how much the base takes at least (scaled to 4/8 bits): no need to load it to know."""
    from glmtune.errors import GlmtuneError
    from glmtune.parsing import parse_args
    from glmtune.speed.memory import check_before_loading

    weights = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors")) / 2**30
    config = parse_args("lora", ["--do_train", "--train_file", str(TOY_TRAIN), "--model_name_or_path",
                                 str(tiny_model_dir), "--output_dir", str(tmp_path / "out")])  # fmt: skip
    # The tiny model's files are float32; loaded in 16 bits it takes half. The flag needs a GPU, the check only files.
    config.run.max_memory_gib = weights * 0.4
    with pytest.raises(GlmtuneError, match=r"^--max_memory_gib [0-9.e-]+: the base's weights alone take at least"):
        check_before_loading(config)
    config.model.quantization_bit = 4  # an eighth of the files' width fits
    check_before_loading(config)
    config.run.max_memory_gib = weights * 2
    config.model.quantization_bit = None
    check_before_loading(config)
