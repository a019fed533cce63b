"""`pretrain`: builds the embedded `opt-tiny` or `llama-tiny` from scratch on the pydocs corpus.

A byte-level BPE tokenizer is trained on the train split, then an OPT- or Llama-architecture model with
most of its parameters in the decoder layers (pruning touches only those) is trained on packed blocks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from ..architecture import decoder_layout
from ..config import PretrainConfig, TrainConfig
from ..data import eval_tokens, load_corpus, training_blocks
from ..models import save_model
from ..perplexity import perplexity
from ..settings import flat_values
from ..training import train_causal_lm

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: pad 1, bos/eos 2


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE like GPT-2/OPT's, with `</s>` prepended as OPT's tokenizer does."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    bos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=1 << 30,
    )


def model_config(config: PretrainConfig, **ids):
    """The transformers config of `config.arch` at these sizes; `ids`: the vocabulary and special tokens."""
    ids.setdefault("vocab_size", config.vocab_size)
    if config.arch == "llama":
        return LlamaConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            intermediate_size=config.resolved("ffn_dim"),
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.resolved("num_kv_heads"),
            max_position_embeddings=config.max_positions,
            attention_dropout=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    return OPTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        ffn_dim=config.resolved("ffn_dim"),
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        word_embed_proj_dim=config.hidden_size,
        dropout=0.0,
        attention_dropout=0.0,
        do_layer_norm_before=True,
        tie_word_embeddings=True,
        **ids,
    )


def build_model(config: PretrainConfig, tokenizer):
    """A freshly initialized model of `config.arch`, embeddings tied to the head (as OPT and Llama-3.2-1B)."""
    torch.manual_seed(config.seed)
    lm = LlamaForCausalLM if config.arch == "llama" else OPTForCausalLM
    return lm(
        model_config(
            config,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def model_settings(config: PretrainConfig) -> dict:
    """The settings that make the model (what its card's command repeats), not where it goes."""
    return {k: v for k, v in flat_values(config).items() if k not in ("output_dir", "experiment") and v is not None}


def pretrain(config: PretrainConfig, on_log=None) -> dict:
    output_dir = Path(config.resolved("output_dir"))
    started = time.perf_counter()
    corpus = load_corpus("pydocs")
    tokenizer = train_tokenizer(corpus.train_text, config.vocab_size)
    model = build_model(config, tokenizer)
    blocks = training_blocks(corpus, tokenizer, config.max_positions)
    epochs = math.ceil(config.steps * config.batch_size / blocks.shape[0])
    train_config = TrainConfig(
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_schedule="cosine",
        batch_size=config.batch_size,
        epochs=epochs,
        max_steps=math.ceil(config.steps / epochs),
        seed=config.seed,
    )
    result = train_causal_lm(model, blocks, train_config, desc=f"Pretraining {config.name}", on_log=on_log)
    test = perplexity(model, eval_tokens(corpus, tokenizer, "test", config.max_positions), config.max_positions)
    validation = perplexity(
        model, eval_tokens(corpus, tokenizer, "validation", config.max_positions), config.max_positions
    )
    save_model(model, tokenizer, output_dir)
    n_params = sum(p.numel() for p in model.parameters())
    n_decoder = sum(p.numel() for p in decoder_layout(model).layers.parameters())
    summary = {
        "config": model_settings(config),
        "corpus": corpus.describe(),
        "train_blocks": blocks.shape[0],
        "optimizer_steps": result.steps,
        "epochs": epochs,
        "final_train_loss": result.final_loss,
        "test_perplexity": test.perplexity,
        "validation_perplexity": validation.perplexity,
        "parameters": n_params,
        "decoder_layer_parameters": n_decoder,
        "train_seconds": result.seconds,
        "total_seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        "name": config.name,
        "class": type(model).__name__,
        "layer_shape": f"{config.num_layers} x {config.hidden_size} x {config.resolved('ffn_dim')} x {config.num_heads}"
        + (f" ({config.resolved('num_kv_heads')} key/value heads)" if config.arch == "llama" else ""),
    }
    (output_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "README.md").write_text(model_card(summary))
    return summary


def model_card(summary: dict) -> str:
    c = summary["config"]
    corpus = summary["corpus"]
    name = summary.get("name", "opt-tiny")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in c.items())
    return f"""# {name}

A causal LM (`{summary.get("class", "OPTForCausalLM")}`) trained from scratch on the `pydocs` corpus: the
standard-library documentation of Python {corpus.get("corpus_python")}. It is embedded in this project so that
pruning, training and evaluation run offline. It is a test subject, not a useful language model.

| | |
|---|---|
| layers x hidden x ffn x heads | {summary.get("layer_shape")} |
| vocabulary | {c["vocab_size"]} (byte-level BPE trained on the pydocs train split) |
| positions (seqlen) | {c["max_positions"]} |
| parameters | {summary["parameters"]:,}, of which {summary["decoder_layer_parameters"]:,} ({100 * summary["decoder_layer_parameters"] / summary["parameters"]:.0f}%) in the decoder layers |
| corpus | pydocs, {corpus["corpus_bytes"]:,} bytes, digest `{corpus["corpus_digest"]}` |
| training | {summary["optimizer_steps"]} AdamW steps of {c["batch_size"]} x {c["max_positions"]} tokens ({summary["epochs"]} epochs), cosine lr {c["lr"]}, seed {c["seed"]} |
| training time | {summary["train_seconds"] / 60:.1f} min on 2 CPU cores (torch {summary["torch"]}) |
| final train loss | {summary["final_train_loss"]:.4f} |
| **dense test perplexity (pydocs)** | **{summary["test_perplexity"]:.2f}** |
| dense validation perplexity | {summary["validation_perplexity"]:.2f} |

Reproduce with

```
python -m pipeline pretrain {flags} --output-dir pipeline/assets/{name}
```

Perplexities are computed as the SparseGPT reference does (non-overlapping windows of {c["max_positions"]} tokens).
The corpus is rebuilt from the running Python's documentation: another Python version gives another
digest, and then these numbers do not apply.
"""
