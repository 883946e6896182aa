"""The data formats, the LoRA options and continued training as users reach them: through the shipped train.sh and
evaluate.sh on the embedded default (tiny GLM), with the scripts' variables, from a folder of the user's holding
data/examples/ (the files data/README.md trains on) and a PromptCBLUE-style test file.

The entry point's own tests check each option's numbers (tests/test_lora_options.py, test_warm_start.py,
test_data_formats.py); here the question is whether each variable gets from the script to the run and the run's
files. Seven training runs and their evaluations in four independent chains, two at a time (CI has two cores, and
most of a run is imports).
"""

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_scripts import bash

pytestmark = pytest.mark.slow
# Short runs: 4 optimizer steps of 2 samples, short answers.
SHORT = dict(MAX_STEPS="4", SAVE_STEPS="4", BATCH_SIZE="2", MAX_TARGET_LENGTH="24", EVAL_BATCH_SIZE="8")
SHORT["OMP_NUM_THREADS"] = "1"  # two runs share the two cores
EXAMPLES = "data/examples"
DORA = dict(USE_DORA="True", USE_RSLORA="True")  # a warm start repeats the adapter's settings
PROMPTCBLUE = [  # input / target / ids, as PromptCBLUE's test files have them
    {"input": "以下是一段医患对话，请总结：头痛三天。", "target": "头痛", "sample_id": "s-17", "task_type": "cls"},
    {"input": "找出句子中的药物：口服阿莫西林。", "target": "阿莫西林", "sample_id": "s-4", "task_type": "ner"},
    {"input": "这句话的意图是什么：挂号怎么挂？", "target": "挂号", "sample_id": "s-9", "task_type": "cls"},
]


def lora_out(name: str) -> str:
    return f"output/examples-{name}-lora-8-5e-3"  # lora/train.sh's OUTPUT_DIR for TRAIN_FILE=data/examples/<name>.*


def pt_out(name: str) -> str:
    return f"output/examples-{name}-pt-32-2e-2"


# Each chain: (script, variables, extra arguments, log name) run in order; a warm start follows what it continues.
CHAINS = [
    [  # LoRA with every option that combines, on TSV alpaca; then continued on messages (JSON lines)
        ("lora/train.sh", dict(DATA_FORMAT="alpaca", TRAIN_FILE=f"{EXAMPLES}/alpaca.tsv", INIT_LORA_WEIGHTS="gaussian",
                               LORAPLUS_LR_RATIO="16", **DORA), [], "lora-alpaca"),
        ("lora/evaluate.sh", dict(TRAIN_FILE=f"{EXAMPLES}/alpaca.tsv", TEST_FILE=f"{EXAMPLES}/alpaca.json"), [],
         "eval-lora-alpaca"),
        ("lora/train.sh", dict(DATA_FORMAT="messages", TRAIN_FILE=f"{EXAMPLES}/messages.jsonl",
                               LORA_CHECKPOINT=lora_out("alpaca"), **DORA), [], "lora-messages"),
        ("lora/evaluate.sh", dict(DATA_FORMAT="messages", TRAIN_FILE=f"{EXAMPLES}/messages.jsonl",
                                  TEST_FILE=f"{EXAMPLES}/messages.jsonl"), [], "eval-lora-messages"),
    ],
    [  # P-Tuning v2 on alpaca (JSON array); a PromptCBLUE submission; continued on ChatGLM3 conversations
        ("ptuning/train.sh", dict(DATA_FORMAT="alpaca", TRAIN_FILE=f"{EXAMPLES}/alpaca.json"), [], "pt-alpaca"),
        ("ptuning/evaluate.sh", dict(TEST_FILE="PromptCBLUE/test.json", PROMPT_COLUMN="input", RESPONSE_COLUMN="target",
                                     CHECKPOINT=pt_out("alpaca")), ["--keep_columns", "sample_id,task_type"],
         "eval-pt-promptcblue"),
        ("ptuning/train.sh", dict(DATA_FORMAT="conversations", TRAIN_FILE=f"{EXAMPLES}/conversations.jsonl",
                                  PTUNING_CHECKPOINT=pt_out("alpaca")), [], "pt-conversations"),
        ("ptuning/evaluate.sh", dict(TRAIN_FILE=f"{EXAMPLES}/conversations.jsonl",
                                     TEST_FILE=f"{EXAMPLES}/conversations.jsonl"), [], "eval-pt-conversations"),
    ],
    [  # PiSSA on CSV prompt/response records with history; OLoRA on messages
        ("lora/train.sh", dict(INIT_LORA_WEIGHTS="pissa", DATA_FORMAT="prompt_response", HISTORY_COLUMN="history",
                               TRAIN_FILE=f"{EXAMPLES}/prompt_response.csv"), [], "lora-pissa"),
        ("lora/evaluate.sh", dict(HISTORY_COLUMN="history", TRAIN_FILE=f"{EXAMPLES}/prompt_response.csv",
                                  TEST_FILE=f"{EXAMPLES}/prompt_response.csv"), [], "eval-lora-pissa"),
        ("lora/train.sh", dict(INIT_LORA_WEIGHTS="olora", TRAIN_FILE=f"{EXAMPLES}/messages.jsonl",
                               OUTPUT_DIR="output/olora"), [], "lora-olora"),
        ("lora/evaluate.sh", dict(CHECKPOINT="output/olora", TEST_FILE=f"{EXAMPLES}/messages.jsonl"), [],
         "eval-lora-olora"),
    ],
    [  # AdaLoRA on conversations
        ("lora/train.sh", dict(LORA_VARIANT="adalora", DATA_FORMAT="conversations",
                               TRAIN_FILE=f"{EXAMPLES}/conversations.jsonl"), [], "lora-adalora"),
        ("lora/evaluate.sh", dict(TRAIN_FILE=f"{EXAMPLES}/conversations.jsonl",
                                  TEST_FILE=f"{EXAMPLES}/conversations.jsonl"), [], "eval-lora-adalora"),
    ],
]  # fmt: skip


def run_chain(folder, chain, snapshots: dict) -> None:
    for script, variables, args, name in chain:
        if "LORA_CHECKPOINT" in variables or "PTUNING_CHECKPOINT" in variables:
            start = folder / (variables.get("LORA_CHECKPOINT") or variables["PTUNING_CHECKPOINT"])
            snapshots[name] = digest(start)
        bash(script, *args, cwd=folder, log=folder / f"{name}.log", **SHORT, **variables)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """A folder of the user's: data/ (the checkout's, for data/examples/) and PromptCBLUE/test.json; every chain run
    in it. Returns the folder and, for each warm start, a digest of the checkpoint it started from (taken before)."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "data").symlink_to(REPO / "data")
    (folder / "PromptCBLUE").mkdir()
    lines = [json.dumps(row, ensure_ascii=False) for row in PROMPTCBLUE]
    (folder / "PromptCBLUE" / "test.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    snapshots = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(run_chain, folder, chain, snapshots) for chain in CHAINS]:
            future.result()
    return folder, snapshots


def digest(folder) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def log(folder, name) -> str:
    return (folder / f"{name}.log").read_text(encoding="utf-8")


def predictions(folder, out) -> list:
    lines = (folder / out / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def records(path) -> int:
    """Rows of an example file: a JSON array's items, a CSV/TSV's rows after the header, JSON lines."""
    text = (REPO / path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        return len(json.loads(text))
    return len(text.splitlines()) - (1 if path.endswith((".csv", ".tsv")) else 0)


@pytest.mark.parametrize(
    "train_log, source",
    [
        ("lora-alpaca", "alpaca.tsv"),
        ("lora-messages", "messages.jsonl"),
        ("pt-alpaca", "alpaca.json"),
        ("pt-conversations", "conversations.jsonl"),
        ("lora-adalora", "conversations.jsonl"),
        ("lora-pissa", "prompt_response.csv"),
    ],
)
def test_each_format_trains_through_train_sh(user_folder, train_log, source):
    """None of these files has the scripts' default fields (content, summary) but the CSV: a run that read them in
    another format would stop with a missing-field error."""
    folder, _ = user_folder
    out = folder / (pt_out if train_log.startswith("pt-") else lora_out)(source.split(".")[0])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[-1]["step"] == 4 and history[-1]["train_loss"] > 0
    assert json.loads((out / "run.json").read_text())["effective_batch"] == 2


@pytest.mark.parametrize(
    "out, test_file",
    [
        (lora_out("alpaca"), "alpaca.json"),  # a TSV-trained adapter on the JSON array of the same records
        (lora_out("messages"), "messages.jsonl"),
        (pt_out("conversations"), "conversations.jsonl"),
        (lora_out("conversations"), "conversations.jsonl"),
        (lora_out("prompt_response"), "prompt_response.csv"),
        ("output/olora", "messages.jsonl"),
    ],
)
def test_evaluate_sh_answers_every_record_of_each_format(user_folder, out, test_file):
    folder, _ = user_folder
    rows = predictions(folder, out)
    assert len(rows) == records(f"{EXAMPLES}/{test_file}")
    assert all(row.keys() == {"labels", "predict"} and row["labels"] for row in rows)
    scores = json.loads((folder / out / "predict_results.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"} <= scores.keys()


def test_detection_names_the_format_of_a_file_given_without_data_format(user_folder):
    """evaluate.sh without DATA_FORMAT on alpaca records: detected from the first record, and said."""
    folder, _ = user_folder
    assert f"{EXAMPLES}/alpaca.json: data format alpaca (from its first record" in log(folder, "eval-lora-alpaca")


def test_lora_options_reach_the_adapter_and_the_optimizer(user_folder):
    folder, _ = user_folder
    config = json.loads((folder / lora_out("alpaca") / "adapter_config.json").read_text())
    assert (config["use_dora"], config["use_rslora"]) == (True, True)
    assert json.loads((folder / lora_out("alpaca") / "run.json").read_text())["trained_weights"] == {
        "lora_rank": 8, "lora_target": "all", "use_dora": True, "use_rslora": True, "init_lora_weights": "gaussian",
    }  # fmt: skip
    state = torch.load(folder / lora_out("alpaca") / "checkpoint-4" / "optimizer.pt", weights_only=False)
    rates = {group["initial_lr"] for group in state["param_groups"] if group["params"]}
    assert rates == {5e-3, 16 * 5e-3}  # LoRA+: B at LORAPLUS_LR_RATIO x LR
    magnitudes = [k for k in load_file(folder / lora_out("alpaca") / "adapter_model.safetensors") if "magnitude" in k]
    assert magnitudes  # DoRA's trained magnitude vectors are saved


def test_adalora_pissa_and_olora_runs_save_what_peft_loads(user_folder):
    folder, _ = user_folder
    adalora = json.loads((folder / lora_out("conversations") / "adapter_config.json").read_text())
    assert adalora["peft_type"] == "ADALORA" and adalora["target_r"] == 8 and adalora["rank_pattern"]
    for out in (lora_out("prompt_response"), "output/olora"):  # PiSSA, OLoRA
        config = json.loads((folder / out / "adapter_config.json").read_text())
        # saved converted to a plain LoRA of twice the rank over the unchanged base (README: PiSSA and OLoRA)
        assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (16, 64, True)


@pytest.mark.parametrize(
    "train_log, start, out, weights",
    [
        ("lora-messages", lora_out("alpaca"), lora_out("messages"), "adapter_model.safetensors"),
        ("pt-conversations", pt_out("alpaca"), pt_out("conversations"), "prefix_encoder.safetensors"),
    ],
)
def test_a_warm_start_trains_the_given_checkpoint_and_leaves_it_alone(user_folder, train_log, start, out, weights):
    folder, snapshots = user_folder
    assert f"Continuing training from {start} (warm start: new optimizer and schedule)" in log(folder, train_log)
    assert digest(folder / start) == snapshots[train_log]  # the checkpoint it started from is not written to
    before, after = load_file(folder / start / weights), load_file(folder / out / weights)
    assert before.keys() == after.keys()
    moved = [torch.dist(before[k].float(), after[k].float()) / before[k].float().norm() for k in before]
    # trained further (moved), from the checkpoint (a fresh start would be as far as the weights are large)
    assert 0 < max(moved) < 0.5, moved


def test_keep_columns_writes_a_promptcblue_submission(user_folder):
    folder, _ = user_folder
    rows = predictions(folder, pt_out("alpaca"))
    assert [list(row) for row in rows] == [["sample_id", "task_type", "labels", "predict"]] * len(PROMPTCBLUE)
    assert [(r["sample_id"], r["task_type"], r["labels"]) for r in rows] == [
        (p["sample_id"], p["task_type"], p["target"]) for p in PROMPTCBLUE
    ]
