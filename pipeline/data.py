"""Datasets as the SparseGPT reference code reads them, plus the offline `pydocs` and `text:PATH` corpora.

Every corpus yields the same three things: an evaluation text tokenized once as a whole (as the
reference does), calibration windows for one-shot pruning, and packed training blocks for recovery
training.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from datasets import load_dataset
from transformers.utils import logging as hf_logging

from .caching import cache_dir, replace_atomically
from .errors import ConfigError, UserError, option
from .hub import offline_when_unreachable
from .pydocs import build_pydocs_splits, python_version

DATASETS = ("wikitext2", "ptb", "c4", "pydocs", "text:PATH")
C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256
C4_TRAINING_DOCUMENTS = 20000  # recovery training reads this prefix of the 356k-document shard


@dataclass
class Corpus:
    name: str
    train_text: str  # one token stream: calibration windows and training blocks
    eval_texts: dict  # split -> text, tokenized once as a whole
    eval_max_windows: int | None = None
    train_documents: list | None = None  # c4 only: calibration draws whole documents, as the reference
    tags: dict = field(default_factory=dict)
    source_type: str = "local"  # where it comes from, for MLflow's dataset records: hugging_face,
    source: str = ""  # code (pydocs) or local (text:PATH)

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256(self.train_text.encode("utf-8"))
        for split in sorted(self.eval_texts):
            h.update(split.encode() + b"\0" + self.eval_texts[split].encode("utf-8"))
        return h.hexdigest()

    @property
    def held_out_validation(self) -> bool:
        """Whether its validation split is text of its own, not its test split again: what a choice made on
        validation needs."""
        return self.eval_texts.get("validation", self.eval_texts["test"]) != self.eval_texts["test"]

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "corpus_digest": self.digest[:16],
            "corpus_bytes": len(self.train_text.encode("utf-8"))
            + sum(len(t.encode("utf-8")) for t in self.eval_texts.values()),
            **self.tags,
        }

    def dataset_input(self, split: str, tokens: int, context: str) -> dict:
        """What MLflow records of a dataset a run read (MLflowTracker.log_input's fields)."""
        part = hashlib.sha256(f"{self.digest}:{context}:{split}".encode()).hexdigest()[:16]  # one dataset per use
        return {
            "name": self.name,
            "digest": part,
            "source_type": self.source_type,
            "source": self.source or self.name,
            "context": context,
            "profile": {"split": split, "tokens": tokens, "corpus_digest": self.digest[:16]},
        }

    def eval_text(self, split: str) -> str:
        if split not in self.eval_texts:
            raise ConfigError(
                f"dataset {self.name} has no '{split}' split; use one of {', '.join(sorted(self.eval_texts))}"
            )
        return self.eval_texts[split]


def _hub_dataset(loader_name: str, *args, **kwargs):
    """`datasets.load_dataset`, with the offline failure turned into one line."""
    with offline_when_unreachable() as unreachable:
        try:
            return load_dataset(*args, **kwargs)
        except Exception as error:  # datasets raises ConnectionError, OSError, DatasetNotFoundError, ...
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    where = (
        f"is not in the local HF datasets cache and the hub could not be reached ({unreachable})"
        if unreachable
        else f"could not be loaded ({detail})"
    )
    raise UserError(
        f"dataset '{loader_name}' {where}; use {option('dataset')} pydocs or {option('dataset')} "
        "text:PATH, or fill the HF datasets cache on a machine with network access"
    )


def wikitext2_corpus(train: list, validation: list, test: list) -> Corpus:
    """WikiText-2 as the reference reads it: evaluation lines joined with blank lines ("\\n\\n")."""
    return Corpus(
        "wikitext2",
        " ".join(train),
        {"validation": "\n\n".join(validation), "test": "\n\n".join(test)},
        source_type="hugging_face",
        source="wikitext/wikitext-2-raw-v1",
    )


def ptb_corpus(train: list, validation: list, test: list) -> Corpus:
    """PTB as the reference reads it: sentences joined with single spaces."""
    return Corpus(
        "ptb",
        " ".join(train),
        {"validation": " ".join(validation), "test": " ".join(test)},
        source_type="hugging_face",
        source="ptb_text_only/penn_treebank",
    )


def c4_corpus(train_documents: list, validation_documents: list) -> Corpus:
    """C4 as the reference reads it: the first 1100 validation documents joined with spaces, evaluated on
    their first 256 windows (the `test` split, as the papers report it); the next 1100 documents are the
    held-out `validation` split a learning-rate sweep selects on. Calibration draws whole train documents
    (see calibration_windows)."""
    eval_text = " ".join(validation_documents[:C4_EVAL_DOCUMENTS])
    held_out = " ".join(validation_documents[C4_EVAL_DOCUMENTS : 2 * C4_EVAL_DOCUMENTS]) or eval_text
    return Corpus(
        "c4",
        " ".join(train_documents[:C4_TRAINING_DOCUMENTS]),
        {"validation": held_out, "test": eval_text},
        eval_max_windows=C4_EVAL_WINDOWS,
        train_documents=list(train_documents),
        source_type="hugging_face",
        source=f"allenai/c4:{C4_TRAIN_SHARD},{C4_VALIDATION_SHARD}",
    )


def _wikitext2() -> Corpus:
    return wikitext2_corpus(
        *(
            _hub_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", split=s)["text"]
            for s in ("train", "validation", "test")
        )
    )


def _ptb() -> Corpus:
    return ptb_corpus(
        *(
            _hub_dataset("ptb", "ptb_text_only", "penn_treebank", split=s)["sentence"]
            for s in ("train", "validation", "test")
        )
    )


def _c4() -> Corpus:
    train = _hub_dataset("c4", "allenai/c4", data_files={"train": C4_TRAIN_SHARD}, split="train")
    valid = _hub_dataset("c4", "allenai/c4", data_files={"validation": C4_VALIDATION_SHARD}, split="validation")
    return c4_corpus(train["text"], valid[: 2 * C4_EVAL_DOCUMENTS]["text"])


def _pydocs() -> Corpus:
    splits = build_pydocs_splits(cache_dir())
    return Corpus(
        "pydocs",
        splits["train"],
        {"validation": splits["validation"], "test": splits["test"]},
        tags={"corpus_python": python_version()},
        source_type="code",
        source=f"the standard library documentation of Python {python_version()}",
    )


def _read_utf8(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}); convert it with `iconv -t utf-8`") from None
    if not text.strip():
        raise ConfigError(f"{path} is empty: give it some text")
    return text


VALIDATION_FILES = ("validation.txt", "valid.txt")  # a text:DIR's validation split, the first found


def _text_path(path: str) -> Corpus:
    root = Path(path).expanduser()
    if root.is_dir():
        if not (root / "train.txt").exists() or not (root / "test.txt").exists():
            raise ConfigError(
                f"directory {root} must hold train.txt and test.txt (validation.txt or valid.txt is optional)"
            )
        test = _read_utf8(root / "test.txt")
        held_out = next((root / name for name in VALIDATION_FILES if (root / name).exists()), None)
        validation = _read_utf8(held_out) if held_out else test  # without one, evaluating it is the test split
        return Corpus(
            f"text:{path}",
            _read_utf8(root / "train.txt"),
            {"validation": validation, "test": test},
            source=str(root.resolve()),
        )
    if not root.exists():
        raise ConfigError(f"{option('dataset')} text:{path}: no such file or directory")
    text = _read_utf8(root)
    return Corpus(f"text:{path}", text, {"validation": text, "test": text}, source=str(root.resolve()))


def load_corpus(name: str) -> Corpus:
    if name.startswith("text:"):
        return _text_path(name[len("text:") :])
    loaders = {"wikitext2": _wikitext2, "ptb": _ptb, "c4": _c4, "pydocs": _pydocs}
    if name not in loaders:
        raise ConfigError(f"unknown dataset '{name}': use one of {', '.join(DATASETS)}")
    return loaders[name]()


# --- tokenization, cached on disk ---------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized at once, as `tokenizer(text, return_tensors="pt")` in the reference.

    Cached by (tokenizer, text) digest: tokenizing WikiText-2's train split takes a while, and a
    pruning grid reads it many times.
    """
    key = hashlib.sha256((tokenizer_fingerprint(tokenizer) + "\0").encode() + text.encode("utf-8"))
    path = cache_dir() / f"tokens-{key.hexdigest()[:24]}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a cache entry cut short by a kill is rebuilt, never trusted
            path.unlink(missing_ok=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "sequence longer than model_max_length" warning is expected here
    try:
        ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
    finally:
        hf_logging.set_verbosity(verbosity)
    replace_atomically(path, lambda tmp: torch.save(ids, tmp))
    return ids


def eval_tokens(corpus: Corpus, tokenizer, split: str, seqlen: int) -> torch.Tensor:
    """The split's token stream (C4: its first 256 windows, as the reference); at least one whole window."""
    ids = tokenize_stream(tokenizer, corpus.eval_text(split))
    if ids.numel() < seqlen:
        raise ConfigError(
            f"the {split} split of {corpus.name} has {ids.numel()} tokens, fewer than one window of "
            f"{seqlen}; use more text or a smaller {option('seqlen')}"
        )
    if corpus.eval_max_windows is not None:
        ids = ids[: corpus.eval_max_windows * seqlen]
    return ids


def training_blocks(corpus: Corpus, tokenizer, seqlen: int) -> torch.Tensor:
    """The train stream packed into [n_blocks, seqlen]; the partial tail is dropped."""
    ids = tokenize_stream(tokenizer, corpus.train_text)
    n_blocks = ids.numel() // seqlen
    if n_blocks == 0:
        raise ConfigError(
            f"the train split of {corpus.name} has {ids.numel()} tokens, fewer than one "
            f"window of {seqlen}; use more text or a smaller {option('seqlen')}"
        )
    return ids[: n_blocks * seqlen].view(n_blocks, seqlen)


def calibration_windows(corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, drawn exactly as the SparseGPT reference does."""
    random.seed(seed)
    windows = []
    if corpus.train_documents is not None:  # c4: pick a long enough document, then a start in it
        for _ in range(nsamples):
            while True:
                doc = corpus.train_documents[random.randint(0, len(corpus.train_documents) - 1)]
                ids = torch.tensor(tokenizer(doc).input_ids)
                if ids.numel() > seqlen:
                    break
            start = random.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[start : start + seqlen])
        return torch.stack(windows)
    ids = tokenize_stream(tokenizer, corpus.train_text)
    if ids.numel() <= seqlen + 1:
        raise ConfigError(
            f"the train split of {corpus.name} has {ids.numel()} tokens, too few for "
            f"calibration windows of {seqlen}; use a smaller {option('seqlen')}"
        )
    for _ in range(nsamples):
        start = random.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)
