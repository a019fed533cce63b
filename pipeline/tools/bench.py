"""`python -m pipeline bench`: speed and memory of every hot path, each measured side by side with its
baseline in the same process, as ratios against targets (timed tests would only measure the noise of
a shared machine).

    a  masked training step / the same loop without masks                        <= 1.03
    b  our training loop / a bare PyTorch loop (same model, batch, optimizer)     >= 0.95, + FLOP/s vs matmul peak
    c  batched perplexity evaluation / the reference one-window loop (tokens/s)  >= 1.0, same perplexity
    d  SparseGPT per-layer seconds and working memory, 2 vs 8 layers             memory(8) / memory(2) <= 1.10
    e  MLflow logging time per training step, sqlite and `mlflow server`         <= 1% of a step
    f  IMP time outside training steps and evaluations, share of an iteration     <= 5%
       (demo settings: pruning, checkpoint, tracking; the evaluations' share printed beside it)
    g  a training step distilling from a teacher / without (logits, SquareHead)   <= 1.40, <= 1.6
    h  SparseGPT on an OPT-125m-shaped layer / its arithmetic at the matmul peak  <= 1.6

b and g are the medians of ratios taken within each alternated repeat, with their spread (lowest and
highest); the table's header names the CPU or GPU, the threads and the torch build, so that two
machines' figures can be set side by side.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, OPTConfig

from .. import allocator
from ..architecture import decoder_layout
from ..config import BenchConfig, IterativeConfig, PruneConfig, ScheduleConfig, TrainConfig
from ..data import eval_tokens
from ..imp import ImpRun
from ..local_server import LocalMlflowServer
from ..machine import cpu_model
from ..peak_memory import PeakSampler, rss
from ..perplexity import perplexity
from ..pruning import prune_model
from ..pruning.magnitude import magnitude_prune_layerwise
from ..pruning.masks import MaskKeeper, prunable_linears
from ..settings import flat_values
from ..tracking import MLflowTracker, tracked_run
from ..tracking.store import use_tracking_store
from ..training import train_causal_lm, training_flops_per_token
from ..workload import load_workload
from .memory import measuring_pool

# (result key, comparison, target, what it measures)
TARGETS = [
    ("masked_step_ratio", "<=", 1.03, "a masked training step / unmasked"),
    ("loop_throughput_ratio", ">=", 0.95, "b train loop throughput / bare PyTorch loop"),
    ("eval_speedup", ">=", 1.0, "c batched eval tokens/s / one-window loop"),
    ("sparsegpt_memory_depth_ratio", "<=", 1.10, "d SparseGPT working memory, 8 / 2 layers"),
    ("logging_share_sqlite", "<=", 0.01, "e MLflow logging / step time, sqlite"),
    ("logging_share_server", "<=", 0.01, "e MLflow logging / step time, mlflow server"),
    ("imp_overhead_share", "<=", 0.05, "f IMP time outside training, eval / iteration"),
    ("distill_logits_step_ratio", "<=", 1.40, "g step with a logits teacher / without"),
    ("distill_squarehead_step_ratio", "<=", 1.60, "g step with a SquareHead teacher / without"),
    ("sparsegpt_bound_ratio", "<=", 1.60, "h SparseGPT layer / its arithmetic at peak"),
]
# the ratios taken within each repeat: (result key, numerator's variant, denominator's variant)
PAIRED_RATIOS = [
    ("loop_throughput_ratio", "bare", "unmasked"),
    ("distill_logits_step_ratio", "logits", "masked"),
    ("distill_squarehead_step_ratio", "squarehead", "masked"),
]


def machine(device: torch.device) -> dict:
    """What the figures were measured on."""
    facts = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "freed_blocks_kept": allocator.applied,
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def describe_machine(facts: dict) -> str:
    where = facts.get("gpu") or f"{facts['cpu']}, {facts['cpu_count']} cores"
    build = f"torch {facts['torch']}" + (f" CUDA {facts['torch_cuda']}" if facts.get("torch_cuda") else "")
    return f"{where}, {facts['threads']} threads, {build}, {facts['blas']}"


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


def teacher_forward_seconds(teacher, batch: torch.Tensor, repeats: int) -> float:
    """The frozen teacher's forward over one batch (median): what distillation adds before any loss."""
    device = batch.device
    teacher.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            _sync(device)
            times.append(_timed(lambda: (teacher(input_ids=batch, use_cache=False), _sync(device))))
    return statistics.median(times[1:])


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


def alternated(variants: dict, repeats: int) -> dict:
    """Seconds of each variant over `repeats` rounds, the variants alternated within each round so that drifting
    machine load hits every variant alike; the first variant runs once before, to warm up the allocator, the
    kernels and the optimizer state's first touch."""
    next(iter(variants.values()))()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            times[name].append(run())
    return times


def training_step_times(model, linears: dict, subset, config: BenchConfig, teacher) -> dict:
    """Seconds per step of each training variant (masked, unmasked, the bare loop, with each teacher) from one
    starting state, alternated over the repeats."""
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_config = TrainConfig(lr=1e-5, batch_size=config.batch_size, max_steps=config.steps, log_every=config.steps)

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

    variants = {"masked": lambda: ours(True), "unmasked": lambda: ours(False), "bare": bare}
    variants.update({loss: lambda loss=loss: ours(True, loss) for loss in ("logits", "squarehead")})
    return alternated(variants, config.repeats)


def bench_training(model, blocks, config: BenchConfig, device) -> dict:
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.5)
    subset = blocks[: config.batch_size * config.steps]
    teacher = copy.deepcopy(model)
    times = training_step_times(model, linears, subset, config, teacher)
    step = {k: statistics.median(v) for k, v in times.items()}
    paired = {}
    for key, numerator, denominator in PAIRED_RATIOS:
        ratios = [a / b for a, b in zip(times[numerator], times[denominator])]
        paired[key], paired[f"{key}_spread"] = statistics.median(ratios), [min(ratios), max(ratios)]
    teacher_forward = teacher_forward_seconds(teacher, subset[: config.batch_size].to(device), config.repeats)
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
        **paired,
        "train_tokens_per_second": tokens / step["masked"],
        "train_flops_per_second": achieved,
        "matmul_peak_flops_per_second": peak,
        "train_flops_share_of_peak": achieved / peak,
        "step_seconds_logits": step["logits"],
        "step_seconds_squarehead": step["squarehead"],
        "teacher_forward_seconds": teacher_forward,
        # g cannot go below this: the teacher's forward added to the step, the losses free
        "distill_step_ratio_floor": (step["masked"] + teacher_forward) / step["masked"],
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
        before, sampler = rss(), PeakSampler(rss)
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
    the shape of the Llama, Mistral and Qwen families."""
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


def opt_125m_shape(quick: bool) -> dict:
    """OPT-125m's decoder layer (12 heads of 64, MLP 3072, vocabulary 50272), two layers deep: every layer
    costs the same, so two give the per-layer figures without building twelve. Tiny with --quick."""
    width, ffn, heads, vocabulary = (64, 256, 4, 1000) if quick else (768, 3072, 12, 50272)
    return OPTConfig(
        hidden_size=width,
        word_embed_proj_dim=width,
        ffn_dim=ffn,
        num_attention_heads=heads,
        num_hidden_layers=2,
        vocab_size=vocabulary,
        max_position_embeddings=2048,
    ).to_dict()


def inputs_shared(model, window: torch.Tensor) -> list[list[str]]:
    """The first decoder layer's prunable matrices, grouped by the input they are handed in a forward."""
    prefix = f"{decoder_layout(model).layer_prefix}.0."
    groups, held = {}, []

    def record(name):
        def hook(_module, inputs, _output):
            held.append(inputs[0])  # alive, so that no later input takes its id
            groups.setdefault(id(inputs[0]), []).append(name)

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in prunable_linears(model).items()
        if name.startswith(prefix)
    ]
    with torch.no_grad():
        model(input_ids=window, use_cache=False)
    for handle in handles:
        handle.remove()
    return list(groups.values())


def sparsegpt_layer_flops(model, windows: int, seqlen: int, groups: list[list[str]]) -> dict:
    """The arithmetic SparseGPT does on one decoder layer, by phase (FLOPs), for n = windows * seqlen tokens:
    forward        2 n P + 2 w T^2 d: P the layer's matrix weights; causal attention's score and value
                   products over w windows of T tokens, width d
    statistics     the dense forward + 2 n c^2 per distinct input of c columns (matrices handed one
                   input share its Hessian)
    factorization  2/3 c^3 per matrix: a Cholesky factor and a triangular inverse, the least arithmetic that
                   gives H^-1's Cholesky factor (the reference's Cholesky, inverse, Cholesky: 4/3 c^3)
    sweep          r c (c + 1) per r x c matrix: the OBS updates, within the blocks and after each
    """
    linears = prunable_linears(model)
    shapes = {name: tuple(linears[name].weight.shape) for group in groups for name in group}
    tokens = windows * seqlen
    forward = 2 * tokens * sum(r * c for r, c in shapes.values())
    forward += 2 * windows * seqlen**2 * model.config.hidden_size
    hessians = sum(2 * tokens * shapes[group[0]][1] ** 2 for group in groups)
    return {
        "statistics": forward + hessians,
        "factorization": sum(2 / 3 * c**3 for _, c in shapes.values()),
        "sweep": sum(r * c * (c + 1) for r, c in shapes.values()),
        "forward": forward,
    }


def sparsegpt_against_bound(model_config: dict, samples: int, seqlen: int, device: str) -> dict:
    """SparseGPT at 50% on a random model of `model_config`, its seconds per layer
    and phase against the phase's arithmetic at the matmul peak measured just before."""
    torch.manual_seed(0)
    target = torch.device(device)
    config = AutoConfig.for_model(**model_config)
    model = AutoModelForCausalLM.from_config(config).eval()
    windows = torch.randint(0, config.vocab_size, (samples, seqlen))
    flops = sparsegpt_layer_flops(model, samples, seqlen, inputs_shared(model, windows[:1]))
    peak = matmul_peak_flops(target, torch.float32)
    result = prune_model(model, PruneConfig(method="sparsegpt", sparsity=0.5), windows, target)
    seconds = {phase: statistics.mean(r.seconds[phase] for r in result.layers) for phase in flops}
    return {
        "shape": f"{config.hidden_size} wide, MLP {config.ffn_dim}, {samples} x {seqlen} calibration tokens",
        "seconds_per_layer": seconds,
        "flops_per_layer": flops,
        "gflops_per_second": {phase: flops[phase] / seconds[phase] / 1e9 for phase in flops},
        "matmul_peak_flops_per_second": peak,
        "bound_seconds_per_layer": sum(flops.values()) / peak,
        "ratio": sum(seconds.values()) / (sum(flops.values()) / peak),
    }


def bench_sparsegpt_bound(config: BenchConfig, device) -> dict:
    samples, seqlen = (4, 64) if config.quick else (16, 512)
    # in this process, whose allocator keeps freed blocks as a `prune` run's does (d's memory pool maps each anew)
    row = sparsegpt_against_bound(opt_125m_shape(config.quick), samples, seqlen, str(device))
    return {"sparsegpt_opt_125m": row, "sparsegpt_bound_ratio": row["ratio"]}


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
    evaluated = [h["eval_seconds"] for h in history[1:]]
    return {
        "imp_iteration_seconds": walls,
        "imp_train_seconds": trained,
        "imp_eval_seconds": evaluated,
        "imp_eval_share": statistics.mean(e / w for e, w in zip(evaluated, walls)),
        "imp_overhead_share": statistics.mean(1 - (t + e) / w for t, e, w in zip(trained, evaluated, walls)),
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
        "repeats": config.repeats,
        "quick": config.quick,
        "machine": machine(device),
    }
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        workdir = Path(tmp)
        server = LocalMlflowServer(workdir / "server")
        try:
            for name, measure in (
                ("a/b training", lambda: bench_training(model, blocks, config, device)),
                ("c evaluation", lambda: bench_evaluation(model, tokenizer, corpus, seqlen, config)),
                ("d SparseGPT depth", lambda: bench_sparsegpt_depth(model, config, seqlen, device)),
                ("h SparseGPT against its arithmetic", lambda: bench_sparsegpt_bound(config, device)),
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


def sparsegpt_and_imp_lines(results: dict) -> list:
    """The table's notes on SparseGPT (per phase, per shape, against its arithmetic) and on the IMP iterations."""
    lines = []
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
    bound = results["sparsegpt_opt_125m"]
    lines.append(
        f"SparseGPT, OPT-125m's layer ({bound['shape']}): {sum(bound['seconds_per_layer'].values()):.3f} s/layer, "
        f"its arithmetic at the {bound['matmul_peak_flops_per_second'] / 1e9:.0f} GFLOP/s matmul peak "
        f"{bound['bound_seconds_per_layer']:.3f} s; by phase s / GFLOP / GFLOP/s: "
        + ", ".join(
            f"{phase} {bound['seconds_per_layer'][phase]:.3f} / {bound['flops_per_layer'][phase] / 1e9:.1f} / "
            f"{bound['gflops_per_second'][phase]:.0f}"
            for phase in bound["seconds_per_layer"]
        )
    )
    lines.append(
        "IMP iterations: "
        + ", ".join(
            f"{w:.1f}s wall / {t:.1f}s training / {e:.1f}s evaluating"
            for w, t, e in zip(
                results["imp_iteration_seconds"], results["imp_train_seconds"], results["imp_eval_seconds"]
            )
        )
        + f"; the two evaluations' share {results['imp_eval_share']:.1%}"
    )
    return lines


def format_table(results: dict) -> str:
    lines = [
        f"bench on {results['model']}, {results['device']} {results['dtype']}, batch {results['batch_size']} x "
        f"{results['seqlen']} tokens{' (quick)' if results['quick'] else ''}",
        f"machine: {describe_machine(results['machine'])}",
        f"| {'measure':<46} | {'value':>9} | {'spread':>15} | {'target':>8} | met |",
        f"|{'-' * 48}|{'-' * 11}|{'-' * 17}|{'-' * 10}|-----|",
    ]
    for row in verdicts(results):
        spread = results.get(f"{row['key']}_spread")
        spread = f"{spread[0]:.4f}-{spread[1]:.4f}" if spread else ""
        lines.append(
            f"| {row['measure']:<46} | {row['value']:>9.4f} | {spread:>15} | {row['target']:>8} "
            f"| {'yes' if row['met'] else 'NO':<3} |"
        )
    lines.append(
        f"b, g: medians of the ratios within {results['repeats']} alternated repeats (spread: lowest-highest); "
        f"g's floor, the teacher's forward alone ({results['teacher_forward_seconds']:.3f} s): "
        f"{results['distill_step_ratio_floor']:.4f}"
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
    lines += sparsegpt_and_imp_lines(results)
    return "\n".join(lines)
