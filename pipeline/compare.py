"""`compare`: the SPEC §5 grid for one model + dataset, each cell an MLflow run, finished cells reused.

Cells: the dense baseline; one-shot SparseGPT, magnitude and Wanda at every target sparsity; iterative
pruning at every target. A cell is identified by a hash of everything that determines its result (the
`cell_key` tag); a FINISHED run with the same key is reused, not rerun, unless --force.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError

ONE_SHOT_METHODS = ("sparsegpt", "magnitude", "wanda")


@dataclass
class CompareConfig:
    model: str = "opt-tiny"
    dataset: str = "pydocs"
    sparsities: list = field(default_factory=lambda: [0.5, 0.9])
    methods: list = field(default_factory=lambda: [*ONE_SHOT_METHODS, "iterative"])
    prune_percentage: float = 0.1
    epochs_per_iteration: int = 3
    max_iterations: int = 25
    max_steps: int | None = 2500
    batch_size: int = 8
    lr: float = 1e-5
    final_lr: float | None = None
    seed: int = 42
    nsamples: int = 128
    seqlen: int | None = None
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        for s in self.sparsities:
            if not 0.0 < s < 1.0:
                raise UserError(f"sparsity {s} in --sparsities is outside (0, 1)", 2)
        unknown = sorted(set(self.methods) - set(ONE_SHOT_METHODS) - {"iterative"})
        if unknown:
            raise UserError(f"unknown methods {', '.join(unknown)}: use sparsegpt, magnitude, wanda, iterative", 2)


@dataclass
class Cell:
    kind: str          # dense | one-shot | iterative
    method: str
    target: float
    identity: dict     # everything that determines the result

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return "dense" if self.kind == "dense" else f"{self.method} {self.target:.2f}"


def grid(config: CompareConfig, corpus_digest: str) -> list[Cell]:
    base = {"model": config.model, "dataset": config.dataset, "corpus": corpus_digest, "seqlen": config.seqlen,
            "dtype": config.dtype}
    cells = [Cell("dense", "dense", 0.0, {**base, "kind": "dense"})]
    for target in config.sparsities:
        for method in config.methods:
            if method == "iterative":
                continue
            cells.append(Cell("one-shot", method, target, {**base, "kind": "one-shot", "method": method,
                                                           "sparsity": target, "nsamples": config.nsamples}))
    if "iterative" in config.methods:
        training = {k: getattr(config, k) for k in ("prune_percentage", "epochs_per_iteration", "max_iterations",
                                                     "max_steps", "batch_size", "lr", "final_lr", "seed")}
        for target in config.sparsities:
            cells.append(Cell("iterative", "iterative", target,
                              {**base, "kind": "iterative", "target_sparsity": target, **training}))
    return cells


def finished_run_ids(experiment_id: str) -> dict:
    """cell_key -> the newest FINISHED run id carrying it."""
    from mlflow.tracking import MlflowClient

    found = {}
    for run in MlflowClient().search_runs([experiment_id], "attributes.status = 'FINISHED'",
                                          order_by=["attributes.start_time DESC"], max_results=5000):
        key = run.data.tags.get("cell_key")
        if key and key not in found:
            found[key] = run.info.run_id
    return found


def run_cell(cell: Cell, config: CompareConfig) -> None:
    from .evaluation import evaluate_command
    from .iterative import IterativeConfig, iterative_command
    from .prune import prune_command
    from .pruning import PruneConfig

    common = dict(model=config.model, dataset=config.dataset, dtype=config.dtype, device=config.device,
                  seqlen=config.seqlen, experiment=None, trust_remote_code=False)
    if cell.kind == "dense":
        evaluate_command(**common, split="test", batch_size=None)
    elif cell.kind == "one-shot":
        prune_command(**common, config=PruneConfig(method=cell.method, sparsity=cell.target,
                                                   nsamples=config.nsamples),
                      calibration_dataset=None, seed=0,
                      output_dir=Path("pruned_models") / f"compare-{cell.key}")
    else:
        iterative = IterativeConfig(model=config.model, dataset=config.dataset, target_sparsity=cell.target,
                                    prune_percentage=config.prune_percentage,
                                    epochs_per_iteration=config.epochs_per_iteration,
                                    max_iterations=config.max_iterations, batch_size=config.batch_size,
                                    lr=config.lr, final_lr=config.final_lr, max_steps=config.max_steps,
                                    seed=config.seed, seqlen=config.seqlen, dtype=config.dtype,
                                    device=config.device, output_dir=f"checkpoints/compare-{cell.key}")
        from .checkpoint import load_checkpoint

        # A killed iterative cell resumes from its last completed iteration.
        iterative_command(iterative, resume=load_checkpoint(iterative.resolved_output_dir()) is not None)


def compare_command(config: CompareConfig, experiment: str | None, force: bool, output_dir: Path | None,
                    make_report: bool) -> "object":
    from .data import load_corpus
    from .models import resolve_model_source
    from .report import collect_results, markdown_table, publish_report
    from .tracking import run_tags, tracked_run

    resolve_model_source(config.model)
    corpus = load_corpus(config.dataset)
    cells = grid(config, corpus.digest[:16])
    params = {**asdict(config), "force": force}
    with tracked_run(f"compare {Path(config.model).name} {config.dataset}", params,
                     {"model": config.model, "dataset": config.dataset, "kind": "compare"}, experiment) as logger:
        import mlflow

        experiment_id = mlflow.get_run(logger.run_id).info.experiment_id
        done = {} if force else finished_run_ids(experiment_id)
        for number, cell in enumerate(cells, start=1):
            if cell.key in done:
                print(f"[{number}/{len(cells)}] {cell.label}: reusing finished run {done[cell.key]}")
                continue
            print(f"\n[{number}/{len(cells)}] {cell.label}: running", flush=True)
            with run_tags({"cell_key": cell.key, "cell_kind": cell.kind, "cell_method": cell.method,
                           "cell_target": f"{cell.target:.4f}", "grid": logger.run_id}):
                run_cell(cell, config)
        keys = {cell.key for cell in cells}
        table = collect_results(experiment_id, keys)
        name = mlflow.get_experiment(experiment_id).name
        out = output_dir or Path("reports") / name
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "compare.csv", index=False)
        (out / "compare.md").write_text(markdown_table(table) + "\n")
        logger.log_artifact(out / "compare.csv")
        logger.log_artifact(out / "compare.md")
        print("\n" + markdown_table(table))
        if make_report:
            report = publish_report(experiment_id, out, keys)
            print(f"\nreport: {report}")
    return table
