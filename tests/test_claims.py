"""Each remaining claim of the README, tested as it is stated."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import mlflow
import pytest
import torch
from imp_jobs import final_perplexity, iterative_args


def test_nan_loss_through_the_cli_then_resume_with_a_lower_lr(
    tmp_path, tiny_model_dir, corpus_dir, reference_iterative_run
):
    """The command in this process (test_bad_input.here: its exit code and its one line, as a shell sees them)."""
    from test_bad_input import here

    from pipeline.checkpoint import load_checkpoint

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = iterative_args(tiny_model_dir, corpus_dir, "--output-dir", "run")
    failed = here(*command, "--lr", "1e6", cwd=tmp_path, env=env)
    assert failed.returncode == 1 and "Traceback" not in failed.stdout + failed.stderr
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: iteration 1 stopped: the training loss became") and "(lr 1e+06)" in error
    assert "lower --lr" in error and "--resume" in error
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert load_checkpoint(tmp_path / "run")["iteration"] == 0
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    assert mlflow.search_runs(experiment_names=["imp"]).iloc[0]["status"] == "FAILED"
    # --lr, --final-lr, --max-iterations and --device may change on resume; the rest may not
    changed = ["--lr", "2e-3", "--final-lr", "2e-3", "--max-iterations", "25", "--device", "cpu"]
    resumed = here(*command, "--resume", *changed, cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming after iteration 0" in resumed.stdout
    # the reference's lr: its result
    assert final_perplexity(resumed.stdout) == final_perplexity(reference_iterative_run)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["imp"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"  # the failed run, continued
    mlflow.set_tracking_uri(None)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() != before


def test_a_corrupt_checkpoint_is_not_touched(tmp_path):
    from pipeline.checkpoint import CHECKPOINT_NAME

    (tmp_path / "run").mkdir()
    damaged = b"PK\x03\x04" + bytes(range(256)) * 4
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(damaged)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "iterative", "--output-dir", "run", "--resume"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
    )
    assert result.returncode == 1 and "damaged or truncated" in result.stderr
    assert (tmp_path / "run" / CHECKPOINT_NAME).read_bytes() == damaged


def test_cubic_global_final_lr_and_include_in_a_real_run(mlflow_store, tiny_model_dir, corpus_dir):
    from loading import load_model_and_tokenizer

    from pipeline.api import iterative_training_wrapper
    from pipeline.pruning.masks import prunable_linears

    history = iterative_training_wrapper(
        {
            "model_name": str(tiny_model_dir),
            "dataset": f"text:{corpus_dir}",
            "target_sparsity": 0.5,
            "prune_percentage": 0.3,
            "epochs_per_iteration": 1,
            "batch_size": 4,
            "lr": 1e-3,
            "final_lr": 1e-4,
            "train_steps": 2,
            "seqlen": 64,
            "schedule": "cubic",
            "scope": "global",
            "include": r"fc[12]",
            "experiment": "flags",
            "model_dir": "final",
        }
    )
    cubic = [0.5 + (0.0 - 0.5) * (1 - t / 2) ** 3 for t in (1, 2)]  # Zhu & Gupta with T = 2
    assert [h["sparsity"] for h in history[1:]] == pytest.approx(cubic, abs=1e-4)
    assert [h["lr"] for h in history[1:]] == pytest.approx([1e-3, 1e-4])  # geometric from --lr to --final-lr
    model, _ = load_model_and_tokenizer("final")
    linears = prunable_linears(model)
    included = {n: m for n, m in linears.items() if ".fc" in n}
    zeros = sum(int((m.weight == 0).sum()) for m in included.values())
    assert zeros == round(0.5 * sum(m.weight.numel() for m in included.values()))  # one global threshold over fc
    # global: one threshold, so the matrices do not each land on exactly half (layer scope would)
    assert any(int((m.weight == 0).sum()) != round(0.5 * m.weight.numel()) for m in included.values())
    assert all(int((m.weight == 0).sum()) == 0 for n, m in linears.items() if n not in included)


def test_memory_command_prints_the_formula_for_each_published_size(tmp_path):
    from transformers import OPTConfig

    from pipeline.tools.memory import GIB, training_bytes

    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "memory", "--no-measure"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert {"opt-125m", "opt-1.3b", "llama-3.2-1b", "qwen2.5-0.5b", "llama-2-7b"} <= set(rows)
    assert (
        "| 125 M |" in rows["opt-125m"] and "| 1236 M |" in rows["llama-3.2-1b"] and "| 6738 M |" in rows["llama-2-7b"]
    )
    # OPT-125m by hand: 125.24 M parameters, 84.93 M of them in the decoder layers' matrices (12 x 7.08 M)
    params, prunable = 125_239_296, 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    states = ((4 * params + prunable) * 4 + prunable) / GIB  # + the bool copy of the masks the training checks
    assert f"| {states:.1f} GiB |" in rows["opt-125m"]
    config = OPTConfig(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, vocab_size=50272)
    parts = training_bytes(config, 1, 2048, 4, 2)
    per_token = 12 * ((9 * 768 + 2 * 3072) * 2 + 2 * 768) + 50272 * (2 + 8)  # layers, then logits
    assert parts["activations"] + parts["logits"] == 2048 * per_token
    # the teacher: float32 weights, bf16 logits and five 256 MiB chunks of the loss; SquareHead adds 13 hidden
    # states and 12 float32 differences
    teacher = (params * 4 + 2048 * 50272 * 2 + 5 * 256 * 2**20) / GIB
    squarehead = teacher + 2048 * (13 * 768 * 2 + 12 * 768 * 4) / GIB
    assert f"| {teacher:.2f} / {squarehead:.2f} GiB |" in rows["opt-125m"]


def test_ptb_and_c4_are_read_as_the_reference_reads_them():
    from pipeline.data import c4_corpus, calibration_windows, eval_tokens, ptb_corpus, wikitext2_corpus

    ptb = ptb_corpus(["a b", "c d"], ["e f", "g"], ["h i", "j k"])
    assert ptb.eval_text("test") == "h i j k" and ptb.eval_text("validation") == "e f g" and ptb.train_text == "a b c d"
    wiki = wikitext2_corpus(["x"], ["v1", "v2"], [" = Title = ", "", " body "])
    assert wiki.eval_text("test") == " = Title = \n\n\n\n body "
    validation = [f"doc{i}" for i in range(1200)]
    c4 = c4_corpus([f"train {i}" for i in range(10)], validation)
    assert c4.eval_text("test") == " ".join(validation[:1100])  # the first 1100 documents, joined with spaces
    assert c4.eval_text("validation") == " ".join(validation[1100:])  # held out: the documents after them
    assert c4.held_out_validation and ptb.held_out_validation and wiki.held_out_validation

    class Words:  # a tokenizer of whitespace words, enough to count windows
        def __call__(self, text):
            return type("Encoding", (), {"input_ids": [len(w) for w in text.split()]})()

        backend_tokenizer = None
        name_or_path = "words"

        def __len__(self):
            return 100

    long = c4_corpus(["w " * 3 for _ in range(5)], [("word " * 20).strip()] * 1100)
    ids = eval_tokens(long, Words(), "test", 7)
    assert ids.numel() == 256 * 7  # 22000 words: only the first 256 windows are evaluated
    # calibration: pick a document at random, redraw until it has more than seqlen tokens, pick a start
    documents = ["one two", "a b c d e f g h i j", "x y", "k l m n o p q r s t u"]
    draw = calibration_windows(c4_corpus(documents, ["v"]), Words(), 3, 5, seed=0)
    random.seed(0)
    expected = []
    for _ in range(3):
        while True:
            document = documents[random.randint(0, len(documents) - 1)]
            lengths = [len(w) for w in document.split()]
            if len(lengths) > 5:
                break
        start = random.randint(0, len(lengths) - 5 - 1)
        expected.append(lengths[start : start + 5])
    assert draw.tolist() == expected


def test_text_data_problems_exit_2(tmp_path):
    from test_bad_input import assert_one_line, here

    result = here("evaluate", "--dataset", f"text:{tmp_path / 'none'}", cwd=tmp_path)
    assert_one_line(result, 2, "no such file or directory")


def test_the_gpu_dtype_path_on_a_cpu(tmp_path, tiny_model_dir, corpus_dir):
    """A float16 checkpoint trains in float32 weights with bf16 autocast (as on CUDA), its mask kept, its loss
    within bf16 of a float32 run's; evaluation keeps the dtype it is asked for."""
    from loading import load_model_and_tokenizer

    from pipeline.config import DataConfig, ModelConfig, TrainConfig
    from pipeline.pruning.magnitude import magnitude_prune_layerwise
    from pipeline.pruning.masks import model_masks, prunable_linears
    from pipeline.training import train_keeping_masks
    from pipeline.workload import load_workload

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    magnitude_prune_layerwise(prunable_linears(model), 0.5)
    model.half().save_pretrained(tmp_path / "fp16")
    tokenizer.save_pretrained(tmp_path / "fp16")
    data = DataConfig(dataset=f"text:{corpus_dir}", seqlen=64)
    work = load_workload(ModelConfig(model=str(tmp_path / "fp16"), device="cpu"), data, training=True)
    assert {p.dtype for p in work.model.parameters()} == {torch.float32}  # --dtype auto trains float32 weights
    blocks = work.training_blocks()
    masks = model_masks(prunable_linears(work.model))
    reference = load_workload(ModelConfig(model=str(tmp_path / "fp16"), device="cpu"), data, training=True)
    losses = {}
    for name, autocast, target in (("bf16", "bf16", work.model), ("fp32", "none", reference.model)):
        result = train_keeping_masks(
            target,
            prunable_linears(target),
            blocks,
            TrainConfig(lr=1e-3, batch_size=4, max_steps=3, autocast=autocast),
            show_progress=False,
        )
        losses[name] = result.final_loss
    after = model_masks(prunable_linears(work.model))
    assert all(torch.equal(masks[n], after[n]) for n in masks)
    assert {p.dtype for p in work.model.parameters()} == {torch.float32}
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2) and losses["bf16"] != losses["fp32"]
    halves = load_workload(ModelConfig(model=str(tmp_path / "fp16"), device="cpu", dtype="float16"), data)
    assert next(halves.model.parameters()).dtype == torch.float16  # asked for: kept
    auto = load_workload(ModelConfig(model=str(tmp_path / "fp16"), device="cpu"), data)
    assert next(auto.model.parameters()).dtype == torch.float32  # auto on a CPU: float32
