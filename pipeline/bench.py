"""`python -m pipeline bench`: speed and memory of every hot path, each measured side by side with its
baseline in the same process, as ratios against targets (timed tests would only measure the noise of
a shared machine).

    a  masked training step / the same loop without masks                        <= 1.03
    b  our training loop / a bare PyTorch loop (same model, batch, optimizer)     >= 0.95, + FLOP/s vs matmul peak
    c  batched perplexity evaluation / the reference one-window loop (tokens/s)  >= 1.0, same perplexity
    d  SparseGPT per-layer seconds and working memory, 2 vs 8 layers             memory(8) / memory(2) <= 1.10
    e  MLflow logging time per training step, sqlite and `mlflow server`         <= 1% of a step
    f  IMP time outside training steps, share of an iteration (demo settings)    <= 10%
    g  a training step distilling from a teacher / without (logits, SquareHead)   <= 1.45, <= 1.6
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from .config import BenchConfig, IterativeConfig, PruneConfig, ScheduleConfig, TrainConfig
from .data import eval_tokens
from .imp import ImpRun
from .local_server import LocalMlflowServer
from .memory import PeakRSS, measuring_pool, rss
from .perplexity import perplexity
from .pruning import prune_model
from .pruning.magnitude import magnitude_prune_layerwise
from .pruning.masks import MaskKeeper, prunable_linears
from .settings import flat_values
from .tracking import MLflowTracker, tracked_run
from .tracking.store import use_tracking_store
from .training import train_causal_lm, training_flops_per_token
from .workload import load_workload

# (result key, comparison, target, what it measures)
TARGETS = [
    ("masked_step_ratio", "<=", 1.03, "a masked training step / unmasked"),
    ("loop_throughput_ratio", ">=", 0.95, "b train loop throughput / bare PyTorch loop"),
    ("eval_speedup", ">=", 1.0, "c batched eval tokens/s / one-window loop"),
    ("sparsegpt_memory_depth_ratio", "<=", 1.10, "d SparseGPT working memory, 8 / 2 layers"),
    ("logging_share_sqlite", "<=", 0.01, "e MLflow logging / step time, sqlite"),
    ("logging_share_server", "<=", 0.01, "e MLflow logging / step time, mlflow server"),
    ("imp_outside_training_share", "<=", 0.10, "f IMP time outside training steps / iteration"),
    ("distill_logits_step_ratio", "<=", 1.45, "g step with a logits teacher / without"),
    ("distill_squarehead_step_ratio", "<=", 1.60, "g step with a SquareHead teacher / without"),
]


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_training_loop(model, blocks: torch.Tensor, batch_size: int, steps: int, lr: float) -> None:
    """The loop every PyTorch tutorial writes: the baseline our `train` loop is held against."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = blocks[(step * batch_size) % len(blocks) :][:batch_size].to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    model.eval()


def one_window_perplexity(model, input_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> float:
    """The SparseGPT reference's opt_eval loop: one window per forward, loss * seqlen summed."""
    device = next(model.parameters()).device
    n = input_ids.numel() // seqlen
    n = min(n, max_windows) if max_windows else n
    nlls = []
    with torch.no_grad():
        for i in range(n):
            batch = input_ids.reshape(1, -1)[:, i * seqlen : (i + 1) * seqlen].to(device)
            logits = model(batch).logits
            loss = F.cross_entropy(logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (n * seqlen)).item()


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best of a few square matmuls: the machine's attainable matmul FLOP/s in this dtype."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(5):
        _sync(device)
        best = min(best, _timed(lambda: (a @ b, _sync(device))))
    return 2 * n**3 / best


def mask_seconds_per_step(model, linears: dict, batch: torch.Tensor, repeats: int = 20) -> float:
    """The two mask calls a masked step adds, timed alone: the only difference between the masked and
    the unmasked loop, and far below what alternated end-to-end runs resolve on a shared machine."""
    keeper = MaskKeeper(linears)
    model.train()
    model(input_ids=batch, labels=batch, use_cache=False).loss.backward()  # gradients to mask
    device = batch.device
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        keeper.zero_pruned_grads()
        keeper.zero_pruned_weights()
    _sync(device)
    seconds = (time.perf_counter() - started) / repeats
    model.zero_grad(set_to_none=True)
    model.eval()
    return seconds


def bench_training(model, blocks, config: BenchConfig, device) -> dict:
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.5)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_config = TrainConfig(lr=1e-5, batch_size=config.batch_size, max_steps=config.steps, log_every=config.steps)
    subset = blocks[: config.batch_size * config.steps]

    teacher = copy.deepcopy(model)

    def ours(masked: bool, distill: str = "none") -> float:
        model.load_state_dict(initial)
        result = train_causal_lm(
            model,
            subset,
            replace(train_config, distill=distill),
            mask_keeper=MaskKeeper(linears) if masked else None,
            teacher=teacher,
            show_progress=False,
        )
        return result.seconds / result.steps

    def bare() -> float:
        model.load_state_dict(initial)
        return _timed(lambda: bare_training_loop(model, subset, config.batch_size, config.steps, 1e-5)) / config.steps

    ours(True)  # warm-up: allocator, kernels, first-touch of optimizer state
    times = {"masked": [], "unmasked": [], "bare": [], "logits": [], "squarehead": []}
    for _ in range(config.repeats):  # alternated, so drifting machine load hits every variant alike
        times["masked"].append(ours(True))
        times["unmasked"].append(ours(False))
        times["bare"].append(bare())
        times["logits"].append(ours(True, "logits"))
        times["squarehead"].append(ours(True, "squarehead"))
    step = {k: statistics.median(v) for k, v in times.items()}
    mask_seconds = mask_seconds_per_step(model, linears, subset[: config.batch_size].to(device))
    tokens = config.batch_size * blocks.shape[1]
    dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
    peak = matmul_peak_flops(device, dtype)
    achieved = training_flops_per_token(model, blocks.shape[1]) * tokens / step["masked"]
    return {
        "step_seconds_masked": step["masked"],
        "step_seconds_unmasked": step["unmasked"],
        "step_seconds_bare": step["bare"],
        "mask_seconds_per_step": mask_seconds,
        "masked_step_ratio": (step["unmasked"] + mask_seconds) / step["unmasked"],
        "masked_step_ratio_end_to_end": step["masked"] / step["unmasked"],
        "loop_throughput_ratio": step["bare"] / step["unmasked"],
        "train_tokens_per_second": tokens / step["masked"],
        "train_flops_per_second": achieved,
        "matmul_peak_flops_per_second": peak,
        "train_flops_share_of_peak": achieved / peak,
        "step_seconds_logits": step["logits"],
        "step_seconds_squarehead": step["squarehead"],
        "distill_logits_step_ratio": step["logits"] / step["masked"],
        "distill_squarehead_step_ratio": step["squarehead"] / step["masked"],
    }


def bench_evaluation(model, tokenizer, corpus, seqlen: int, config: BenchConfig) -> dict:
    ids = eval_tokens(corpus, tokenizer, "test", seqlen)
    if config.eval_windows:
        ids = ids.reshape(-1)[: config.eval_windows * seqlen]
    windows = ids.numel() // seqlen
    perplexity(model, ids, seqlen)  # warm-up
    batched = perplexity(model, ids, seqlen)
    started = time.perf_counter()
    reference = one_window_perplexity(model, ids, seqlen)
    reference_seconds = time.perf_counter() - started
    return {
        "eval_windows": windows,
        "eval_tokens_per_second": batched.tokens / batched.seconds,
        "eval_tokens_per_second_one_window": windows * seqlen / reference_seconds,
        "eval_speedup": reference_seconds / batched.seconds,
        "eval_perplexity": batched.perplexity,
        "eval_perplexity_one_window": reference,
        "eval_perplexity_rel_diff": abs(batched.perplexity - reference) / reference,
    }


def sparsegpt_at_depth(model_config: dict, layers: int, samples: int, seqlen: int, device: str) -> dict:
    """Runs in a fresh process: SparseGPT at 50% on a random model `layers` deep; time and working memory."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**model_config, "num_hidden_layers": layers})
    model = AutoModelForCausalLM.from_config(config).eval()
    windows = torch.randint(0, config.vocab_size, (samples, seqlen))
    target = torch.device(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before, sampler = rss(), PeakRSS()
    result = prune_model(model, PruneConfig(method="sparsegpt", sparsity=0.5), windows, target)
    peak = torch.cuda.max_memory_allocated() if target.type == "cuda" else sampler.stop()
    phases = {}
    for record in result.layers:
        for phase, seconds in record.seconds.items():
            phases[phase] = phases.get(phase, 0.0) + seconds / len(result.layers)
    return {
        "layers": layers,
        "weights_bytes": weights,
        "working_bytes": peak - before,
        "seconds_per_layer": phases,
        "sparsity": result.sparsity,
    }


def llama_shape_of(config) -> dict:
    """A Llama of the bench model's width: GQA (half the heads for k and v) and a SwiGLU MLP of 8/3 the width,
    the shape of the families that prune most today (Llama, Mistral, Qwen)."""
    h, heads = config.hidden_size, config.num_attention_heads
    return LlamaConfig(
        hidden_size=h,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=8 * h // 3,
        vocab_size=config.vocab_size,
        num_hidden_layers=2,
        max_position_embeddings=config.max_position_embeddings,
    ).to_dict()


def bench_sparsegpt_depth(model, config: BenchConfig, seqlen: int, device) -> dict:
    model_config = model.config.to_dict()
    out = {}
    with measuring_pool(fresh_process_per_task=not config.quick) as pool:
        for layers in (2, 8):
            out[layers] = pool.apply(
                sparsegpt_at_depth, (model_config, layers, config.calibration_samples, seqlen, str(device))
            )
        llama = pool.apply(
            sparsegpt_at_depth, (llama_shape_of(model.config), 2, config.calibration_samples, seqlen, str(device))
        )
    return {
        "sparsegpt": out,
        "sparsegpt_llama_shape": llama,
        "sparsegpt_memory_depth_ratio": out[8]["working_bytes"] / max(1, out[2]["working_bytes"]),
    }


def _logging_seconds_per_step(store_uri: str, steps: int, log_every: int, journal_dir: Path) -> float:
    client = MlflowClient(store_uri)
    experiment = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run = client.create_run(experiment.experiment_id)
    tracker = MLflowTracker(run.info.run_id, journal_dir, store_uri)
    started = time.perf_counter()
    for step in range(1, steps + 1):  # what train_causal_lm's on_log does, every log_every steps
        if step % log_every == 0:
            tracker.log_dict({"train_step_loss": 3.0 + 1 / step, "train_lr": 1e-5}, step=step)
    tracker.close()
    seconds = time.perf_counter() - started
    client.set_terminated(run.info.run_id)
    return seconds / steps


def bench_logging(step_seconds: float, config: BenchConfig, workdir: Path, server) -> dict:
    use_tracking_store()  # the HTTP retry defaults
    out = {}
    sqlite = f"sqlite:///{workdir / 'bench-mlflow.db'}"
    server.start()  # here, not earlier: its start-up would compete with a-d for the cores
    for name, uri in (("sqlite", sqlite), ("server", server.uri)):
        for log_every in (10, 1):
            per_step = _logging_seconds_per_step(uri, config.logged_steps, log_every, workdir)
            suffix = "" if log_every == 10 else "_every_step"
            out[f"logging_seconds_per_step_{name}{suffix}"] = per_step
            out[f"logging_share_{name}{suffix}"] = per_step / step_seconds
    server.stop()
    return out


def bench_imp(config: BenchConfig, seqlen: int, workdir: Path) -> dict:
    """The demo's iteration: 30% of the remaining weights, `imp_steps` steps at lr 1e-3, two evaluations."""
    imp = IterativeConfig(
        model=config.model,
        data=config.data,
        schedule=ScheduleConfig(target_sparsity=0.5, prune_percentage=0.3, max_iterations=2),
        train=TrainConfig(epochs=1, batch_size=config.batch_size, lr=1e-3, max_steps=config.imp_steps),
        output_dir=str(workdir / "imp"),
        save_model=False,
    )
    ended = []
    with tracked_run("bench iterative", flat_values(imp), {"kind": "bench"}, journal_dir=workdir) as tracker:
        history = ImpRun.create(imp, tracker, workdir / "imp").run(
            on_iteration=lambda _: ended.append(time.perf_counter())
        )
    walls = [b - a for a, b in zip(ended, ended[1:])]  # iteration k: end of k-1 to end of k, all included
    trained = [h["train_seconds"] for h in history[1:]]
    shares = [1 - t / w for t, w in zip(trained, walls)]
    return {
        "imp_iteration_seconds": walls,
        "imp_train_seconds": trained,
        "imp_outside_training_share": statistics.mean(shares),
    }


def measure(config: BenchConfig) -> dict:
    """Every measurement of the bench, in one process: its results by key."""
    work = load_workload(config.model, config.data)
    model, tokenizer, corpus, seqlen, device = work.model, work.tokenizer, work.corpus, work.seqlen, work.device
    blocks = work.training_blocks()
    results = {
        "model": config.model.model,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype),
        "seqlen": seqlen,
        "batch_size": config.batch_size,
        "quick": config.quick,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        workdir = Path(tmp)
        server = LocalMlflowServer(workdir / "server")
        try:
            for name, measure in (
                ("a/b training", lambda: bench_training(model, blocks, config, device)),
                ("c evaluation", lambda: bench_evaluation(model, tokenizer, corpus, seqlen, config)),
                ("d SparseGPT depth", lambda: bench_sparsegpt_depth(model, config, seqlen, device)),
                ("e MLflow logging", lambda: bench_logging(results["step_seconds_masked"], config, workdir, server)),
                ("f IMP iteration", lambda: bench_imp(config, seqlen, workdir)),
            ):
                print(f"bench: {name} ...", flush=True)
                section = measure()
                results.update(section)
                print(f"bench: {name}: {json.dumps(section, default=str)}", flush=True)
        finally:
            server.stop()
    return results


def verdicts(results: dict) -> list:
    rows = []
    for key, op, target, label in TARGETS:
        value = results[key]
        met = value <= target if op == "<=" else value >= target
        rows.append({"measure": label, "key": key, "value": value, "target": f"{op} {target:g}", "met": met})
    return rows


def format_table(results: dict) -> str:
    lines = [
        f"bench on {results['model']}, {results['device']} {results['dtype']}, batch {results['batch_size']} x "
        f"{results['seqlen']} tokens{' (quick)' if results['quick'] else ''}",
        f"| {'measure':<46} | {'value':>9} | {'target':>8} | met |",
        f"|{'-' * 48}|{'-' * 11}|{'-' * 10}|-----|",
    ]
    for row in verdicts(results):
        lines.append(
            f"| {row['measure']:<46} | {row['value']:>9.4f} | {row['target']:>8} | {'yes' if row['met'] else 'NO':<3} |"
        )
    lines.append(
        f"training: {results['step_seconds_masked']:.3f} s/step masked, {results['train_tokens_per_second']:.0f} "
        f"tokens/s, {results['train_flops_per_second'] / 1e9:.1f} GFLOP/s = "
        f"{results['train_flops_share_of_peak']:.1%} of the {results['matmul_peak_flops_per_second'] / 1e9:.1f} "
        "GFLOP/s matmul peak"
    )
    lines.append(
        f"evaluation: {results['eval_tokens_per_second']:.0f} vs {results['eval_tokens_per_second_one_window']:.0f} "
        f"tokens/s; perplexity {results['eval_perplexity']:.4f} vs {results['eval_perplexity_one_window']:.4f}"
    )
    for layers, row in results["sparsegpt"].items():
        phases = ", ".join(f"{k} {v:.3f}" for k, v in row["seconds_per_layer"].items())
        lines.append(
            f"SparseGPT {layers} layers: s/layer {phases}; working memory {row['working_bytes'] / 2**20:.1f} MiB, "
            f"weights {row['weights_bytes'] / 2**20:.1f} MiB"
        )
    llama = results["sparsegpt_llama_shape"]
    lines.append(
        "SparseGPT, a Llama of this width (GQA, SwiGLU), 2 layers: s/layer "
        + ", ".join(f"{k} {v:.3f}" for k, v in llama["seconds_per_layer"].items())
    )
    lines.append(
        "IMP iterations: "
        + ", ".join(
            f"{w:.1f}s wall / {t:.1f}s training"
            for w, t in zip(results["imp_iteration_seconds"], results["imp_train_seconds"])
        )
    )
    return "\n".join(lines)
