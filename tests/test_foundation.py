"""Loaders, corpora, perplexity and the evaluate command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from loading import load_model_and_tokenizer

from pipeline.data import calibration_windows, eval_tokens, load_corpus, training_blocks
from pipeline.errors import UserError
from pipeline.perplexity import perplexity


def run_cli(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def reference_perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    """The SparseGPT reference loop, one window at a time: nll = loss * seqlen; exp(sum / (n * seqlen))."""
    n = ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(n):
            batch = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            logits = model(batch).logits
            loss = torch.nn.CrossEntropyLoss()(
                logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
            )
            nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (n * seqlen)).item()


def test_local_model_loads_and_perplexity_matches_one_window_loop(tiny_model_dir, corpus_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    corpus = load_corpus(f"text:{corpus_dir}")
    ids = eval_tokens(corpus, tokenizer, "test", 64)
    batched = perplexity(model, ids, 64, batch_size=5)  # 5 does not divide the window count
    reference = reference_perplexity(model, ids, 64)
    assert batched.windows == ids.numel() // 64
    assert batched.tokens == batched.windows * 64
    assert batched.perplexity == pytest.approx(reference, rel=1e-5)
    # A random model is near-uniform over the vocabulary: perplexity of the order of its size.
    assert 0.3 * len(tokenizer) < batched.perplexity < 3 * len(tokenizer)


def test_last_partial_window_is_dropped(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    ids = torch.randint(0, 300, (3 * 32 + 17,))
    full = perplexity(model, ids, 32)
    exact = perplexity(model, ids[: 3 * 32], 32)
    assert full.windows == 3 and full.perplexity == exact.perplexity


def test_tokenizer_prepends_bos_like_opt(tiny_model_dir):
    _, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    ids = tokenizer("Return the value.").input_ids
    assert ids[0] == tokenizer.bos_token_id == 2
    assert tokenizer.decode(ids[1:]) == "Return the value."


def test_text_path_file_and_directory(tmp_path, corpus_dir):
    single = tmp_path / "one.txt"
    single.write_text("hello world\n\nsecond document", encoding="utf-8")
    corpus = load_corpus(f"text:{single}")
    assert corpus.train_text == corpus.eval_text("test") == corpus.eval_text("validation") == single.read_text()
    directory = load_corpus(f"text:{corpus_dir}")
    assert directory.train_text == (corpus_dir / "train.txt").read_text()
    assert directory.eval_text("validation") == (corpus_dir / "validation.txt").read_text()
    assert directory.eval_text("test") == (corpus_dir / "test.txt").read_text()
    (tmp_path / "dir2").mkdir()
    (tmp_path / "dir2" / "train.txt").write_text("a b c", encoding="utf-8")
    (tmp_path / "dir2" / "test.txt").write_text("d e f", encoding="utf-8")
    assert load_corpus(f"text:{tmp_path / 'dir2'}").eval_text("validation") == "d e f"


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"\xff\xfe\x00bad", "not UTF-8")])
def test_text_path_bad_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_corpus(f"text:{path}")
    with pytest.raises(UserError, match="no such file"):
        load_corpus(f"text:{tmp_path / 'missing.txt'}")


def test_pydocs_is_deterministic_and_splits_disjoint(tmp_path):
    from pipeline.caching import cache_dir
    from pipeline.pydocs import collect_documents, split_of

    first = load_corpus("pydocs")  # as this suite's other processes read it: from the cache
    code = (
        "from pipeline.data import load_corpus; c = load_corpus('pydocs'); "
        "print(c.digest, len(c.train_text), len(c.eval_texts['test']))"
    )
    parsed = dict(os.environ, PIPELINE_CACHE_DIR=str(tmp_path))  # another process, parsing the sources itself
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=parsed)
    assert other.stdout.split() == [first.digest, str(len(first.train_text)), str(len(first.eval_texts["test"]))]
    documents = collect_documents(cache_dir())
    by_split = {}
    for doc in documents:
        by_split.setdefault(split_of(doc), set()).add(doc)
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["validation"])
    assert not (by_split["validation"] & by_split["test"])
    total = sum(len(d) for d in documents)
    share = {k: sum(len(d) for d in v) / total for k, v in by_split.items()}
    assert 0.85 < share["train"] < 0.95 and 0.02 < share["test"] < 0.08
    assert 1_000_000 < first.describe()["corpus_bytes"] < 4_000_000


def test_pydocs_documents_are_parsed_once_per_python_and_again_when_a_source_changes(tmp_path):
    from pydoc_data.topics import topics

    from pipeline.pydocs import collect_documents

    stdlib, cache = tmp_path / "lib", tmp_path / "cache"
    (stdlib / "test").mkdir(parents=True)
    cache.mkdir()
    (stdlib / "walk.py").write_text('"""Walks a tree of nodes in order."""\ndef f():\n    """Too short."""\n')
    (stdlib / "test" / "test_walk.py").write_text('"""Tests are not documentation at all."""\n')
    reference = tuple(dict.fromkeys(topics[key].strip() for key in sorted(topics)))

    def collected():
        collect_documents.cache_clear()  # what another process would see
        return collect_documents(cache, stdlib)

    assert collected() == (*reference, "Walks a tree of nodes in order.")
    [entry] = cache.iterdir()
    entry.write_text(json.dumps(["read from the entry"]))
    assert collected() == ("read from the entry",)  # not parsed again
    entry.write_text('["cut short by a kil')
    assert collected() == (*reference, "Walks a tree of nodes in order.")  # an unreadable entry is rebuilt
    (stdlib / "walk.py").write_text('"""Walks a tree of nodes, depth first."""\n')
    assert collected() == (*reference, "Walks a tree of nodes, depth first.")
    assert len(list(cache.iterdir())) == 2


def test_calibration_windows_follow_the_reference_draw(tiny_model_dir, corpus_dir):
    import random

    _, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    corpus = load_corpus(f"text:{corpus_dir}")
    windows = calibration_windows(corpus, tokenizer, 4, 32, seed=0)
    ids = torch.tensor(tokenizer(corpus.train_text).input_ids)  # the train text tokenized once
    random.seed(0)
    for window in windows:
        start = random.randint(0, ids.numel() - 32 - 1)
        assert torch.equal(window, ids[start : start + 32])
    assert torch.equal(windows, calibration_windows(corpus, tokenizer, 4, 32, seed=0))


def test_training_blocks_are_packed_and_cached(tiny_model_dir, corpus_dir):
    from pipeline.data import cache_dir

    _, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    corpus = load_corpus(f"text:{corpus_dir}")
    blocks = training_blocks(corpus, tokenizer, 64)
    ids = tokenizer(corpus.train_text).input_ids
    assert blocks.shape == (len(ids) // 64, 64)
    assert blocks.reshape(-1).tolist() == ids[: blocks.numel()]
    cached = list(cache_dir().glob("tokens-*.pt"))
    assert cached
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    again = training_blocks(corpus, tokenizer, 64)  # second run reads the cache, writes nothing
    assert torch.equal(again, blocks)
    assert {p: p.stat().st_mtime_ns for p in cache_dir().glob("tokens-*.pt")} == stamps


def test_offline_hub_model_is_one_line_exit_1(tmp_path):
    env = dict(__import__("os").environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = run_cli("evaluate", "--model", "opt-125m", cwd=tmp_path, env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "opt-125m" in lines[0] and "hub could not be reached" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_offline_hub_dataset_is_one_clear_error(tmp_path):
    env = dict(__import__("os").environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = run_cli("evaluate", "--dataset", "wikitext2", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "wikitext2" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "opt-9b"], "unknown model"),
        (["--model", "./no/such/dir"], "does not exist"),
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--seqlen", "4096"], "above the model's 256 positions"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    from test_bad_input import here

    result = here("evaluate", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_logs_to_mlflow(mlflow_store, tiny_model_dir, corpus_dir):
    import mlflow

    from pipeline.config import EvaluateConfig
    from pipeline.jobs.evaluate import run_evaluate
    from pipeline.settings import build

    result = run_evaluate(
        build(
            EvaluateConfig,
            dict(
                model=str(tiny_model_dir),
                dataset=f"text:{corpus_dir}",
                device="cpu",
                seqlen=64,
                experiment="found",
                split="test",
            ),
        )
    )
    runs = mlflow.search_runs(experiment_names=["found"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["metrics.perplexity"] == pytest.approx(result.perplexity)
    assert run["metrics.eval_windows"] == result.windows and run["metrics.eval_tokens"] == result.windows * 64
    assert run["params.seqlen"] == "64" and run["tags.dataset"] == f"text:{corpus_dir}"
    assert len(run["tags.corpus_digest"]) == 16 and int(run["tags.corpus_bytes"]) > 100_000
    assert run["tags.mlflow.runName"].startswith("evaluate ")
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    ids = eval_tokens(load_corpus(f"text:{corpus_dir}"), tokenizer, "test", 64)
    assert result.perplexity == pytest.approx(reference_perplexity(model, ids, 64), rel=1e-5)


FAULTS_OF_A_REUSED_TENSOR = """
import resource, sys, torch
from pipeline.allocator import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "keep" else False
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 << 18)  # 64 MiB, written, then freed: a training step's logits-sized temporary
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_step()
# the fewest of several steps: this machine's kernel may reclaim idle pages of the process now and then
print(applied, min(faults_of_one_step() for _ in range(8)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensor_sized_blocks_are_reused_without_new_page_faults(tmp_path):
    """Without the setting every 64 MiB tensor is mapped anew: its 16384 pages of 4 KiB fault in again."""

    def run(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_TENSOR, mode], capture_output=True, text=True)
        applied, faults = out.stdout.split()
        return applied == "True", int(faults)

    assert run("keep")[0] and run("keep")[1] < 1000
    assert not run("default")[0] and run("default")[1] > 16000 * 0.9
    env_set = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_A_REUSED_TENSOR, "keep"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    assert env_set.stdout.split()[0] == "False"  # the environment's own setting is left alone
