"""`python -m pipeline <command>`: thin Click wrappers; the work happens in the modules they call."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import Terminated, UserError


def model_options(f):
    """--model/--dataset/--dtype/--device/--seqlen/--experiment, shared by every command that loads a model."""
    options = [
        click.option("--model", default="opt-tiny", show_default=True,
                     help="opt-tiny (embedded), opt-125m, opt-350m, opt-1.3b, opt-2.7b, a hub id or a local directory"),
        click.option("--dataset", default="pydocs", show_default=True,
                     help="wikitext2, ptb, c4, pydocs (embedded) or text:PATH"),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
                     show_default=True, help="auto: float32 on CPU, the checkpoint's dtype on CUDA"),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--seqlen", type=click.IntRange(min=2), default=None,
                     help="evaluation window; default the model's max_position_embeddings"),
        click.option("--experiment", default=None, help="MLflow experiment (ignored under `mlflow run`)"),
        click.option("--trust-remote-code", is_flag=True, help="allow a hub model's own Python code to run"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="llm-pruning-pipeline", message="%(version)s")
def cli():
    """Iterative magnitude pruning vs one-shot pruning (SparseGPT, magnitude, Wanda) of causal LMs."""


@cli.command()
@model_options
@click.option("--split", type=click.Choice(["test", "validation"]), default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="windows per forward (default: by memory)")
def evaluate(model, dataset, dtype, device, seqlen, experiment, trust_remote_code, split, batch_size):
    """Perplexity of a model on a dataset (SPEC §3), logged to MLflow."""
    from .evaluation import evaluate_command

    evaluate_command(model=model, dataset=dataset, dtype=dtype, device=device, seqlen=seqlen,
                     experiment=experiment, trust_remote_code=trust_remote_code, split=split,
                     batch_size=batch_size)


def prune_options(f):
    """The one-shot pruning flags, shared by `prune` and the pruning step of `iterative`."""
    options = [
        click.option("--pattern", default="unstructured", show_default=True, help="unstructured or N:M, e.g. 2:4"),
        click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True,
                     help="magnitude: every matrix to the same sparsity, or one threshold over all"),
        click.option("--include", default=None, help="regex: prune only matrices whose name matches"),
        click.option("--exclude", default=None, help="regex: never prune matrices whose name matches"),
        click.option("--nsamples", type=click.IntRange(min=1), default=128, show_default=True,
                     help="calibration windows (SparseGPT, Wanda)"),
        click.option("--blocksize", type=click.IntRange(min=1), default=128, show_default=True),
        click.option("--percdamp", type=click.FloatRange(min=0), default=0.01, show_default=True),
        click.option("--calibration-dataset", default=None,
                     help="default: c4 for hub models (as the reference), pydocs for opt-tiny, the --dataset for a local directory"),
        click.option("--calibration-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="calibration windows per layer forward"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@cli.command()
@model_options
@click.option("--method", type=click.Choice(["magnitude", "sparsegpt", "wanda"]), default="sparsegpt",
              show_default=True)
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="fraction of zeros, in [0, 1)")
@prune_options
@click.option("--seed", type=int, default=0, show_default=True, help="calibration draw (0 as the reference)")
@click.option("--output-dir", type=click.Path(path_type=Path), default=None,
              help="default pruned_models/<model>-<method>-<sparsity>")
def prune(model, dataset, dtype, device, seqlen, experiment, trust_remote_code, method, sparsity, pattern,
          scope, include, exclude, nsamples, blocksize, percdamp, calibration_dataset, calibration_batch_size,
          seed, output_dir):
    """One-shot pruning (magnitude, SparseGPT, Wanda): dense and pruned perplexity, saved model."""
    from .prune import prune_command
    from .pruning import PruneConfig

    config = PruneConfig(method=method, sparsity=sparsity, pattern=pattern, scope=scope, include=include,
                         exclude=exclude, nsamples=nsamples, blocksize=blocksize, percdamp=percdamp,
                         calibration_batch_size=calibration_batch_size)
    prune_command(model=model, dataset=dataset, dtype=dtype, device=device, seqlen=seqlen,
                  experiment=experiment, trust_remote_code=trust_remote_code, config=config,
                  calibration_dataset=calibration_dataset, seed=seed, output_dir=output_dir)


def train_options(f):
    """Recovery-training flags, shared by `train` and `iterative`."""
    options = [
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--lr", type=float, default=1e-5, show_default=True),
        click.option("--max-steps", type=int, default=2500, show_default=True,
                     help="cap on optimizer steps per epoch"),
        click.option("--seed", type=int, default=42, show_default=True),
        click.option("--grad-accum", type=int, default=1, show_default=True),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True),
        click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True),
        click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
                     show_default=True, help="within each training run, after the warmup"),
        click.option("--grad-clip", type=click.FloatRange(min=0), default=1.0, show_default=True),
        click.option("--gradient-checkpointing", is_flag=True, help="trade compute for activation memory"),
        click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
                     help="steps between train_loss points in MLflow"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise UserError(f"--{name} must be positive, got {value}", 2)


@cli.command()
@model_options
@click.option("--epochs", type=int, default=1, show_default=True)
@train_options
@click.option("--output-dir", type=click.Path(path_type=Path), default=None,
              help="default pruned_models/<model>-trained")
def train(model, dataset, dtype, device, seqlen, experiment, trust_remote_code, epochs, batch_size, lr,
          max_steps, seed, grad_accum, weight_decay, warmup_steps, lr_schedule, grad_clip,
          gradient_checkpointing, log_every, output_dir):
    """Fine-tune a (pruned) model on a dataset; pruned weights stay exactly zero."""
    from .distributed import check_launch
    from .finetune import train_command
    from .training import TrainConfig

    check_launch(batch_size)

    for name, value in (("epochs", epochs), ("batch-size", batch_size), ("lr", lr), ("max-steps", max_steps),
                        ("grad-accum", grad_accum)):
        _positive(name, value)
    config = TrainConfig(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, schedule=lr_schedule,
                         grad_clip=grad_clip, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
                         max_steps=max_steps, seed=seed, gradient_checkpointing=gradient_checkpointing,
                         log_every=log_every)
    train_command(model=model, dataset=dataset, dtype=dtype, device=device, seqlen=seqlen, experiment=experiment,
                  trust_remote_code=trust_remote_code, config=config, output_dir=output_dir)


@cli.command()
@model_options
@click.option("--target-sparsity", type=float, default=0.9, show_default=True, help="fraction of zeros to reach")
@click.option("--prune-percentage", type=float, default=0.1, show_default=True,
              help="fraction of the remaining non-zeros pruned per iteration")
@click.option("--epochs-per-iteration", type=int, default=3, show_default=True)
@click.option("--max-iterations", type=int, default=25, show_default=True, help="safety cap")
@train_options
@click.option("--final-lr", type=float, default=None, help="last iteration's lr (default: --lr); geometric in between")
@click.option("--prune-method", type=click.Choice(["magnitude", "sparsegpt", "wanda"]), default="magnitude",
              show_default=True)
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True)
@click.option("--schedule", type=click.Choice(["geometric", "cubic"]), default="geometric", show_default=True)
@click.option("--nsamples", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--calibration-dataset", default=None)
@click.option("--train-seqlen", type=click.IntRange(min=2), default=None, help="default: --seqlen")
@click.option("--eval-split", type=click.Choice(["test", "validation"]), default="test", show_default=True)
@click.option("--output-dir", default=None, help="checkpoint directory (default under checkpoints/)")
@click.option("--resume", is_flag=True, help="continue from the last completed iteration in --output-dir")
@click.option("--save-model/--no-save-model", default=True, show_default=True)
def iterative(model, dataset, dtype, device, seqlen, experiment, trust_remote_code, resume, **options):
    """Iterative magnitude pruning with recovery training (the main job, SPEC §1)."""
    from .distributed import check_launch
    from .iterative import IterativeConfig, iterative_command

    check_launch(options["batch_size"])

    config = IterativeConfig(model=model, dataset=dataset, dtype=dtype, device=device, seqlen=seqlen,
                             experiment=experiment, trust_remote_code=trust_remote_code, **options)
    iterative_command(config, resume=resume)


def _float_list(text: str) -> list:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--sparsities '{text}' is not a comma-separated list of numbers, e.g. 0.5,0.9", 2) from None


@cli.command()
@click.option("--model", default="opt-tiny", show_default=True)
@click.option("--dataset", default="pydocs", show_default=True)
@click.option("--sparsities", default="0.5,0.9", show_default=True, help="comma-separated target sparsities")
@click.option("--methods", default="sparsegpt,magnitude,wanda,iterative", show_default=True)
@click.option("--prune-percentage", type=float, default=0.1, show_default=True)
@click.option("--epochs-per-iteration", type=int, default=3, show_default=True)
@click.option("--max-iterations", type=int, default=25, show_default=True)
@click.option("--max-steps", type=int, default=2500, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--lr", type=float, default=1e-5, show_default=True)
@click.option("--final-lr", type=float, default=None)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--nsamples", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seqlen", type=click.IntRange(min=2), default=None)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--experiment", default=None, help="MLflow experiment (ignored under `mlflow run`)")
@click.option("--force", is_flag=True, help="rerun cells that already have a finished run")
@click.option("--output-dir", type=click.Path(path_type=Path), default=None, help="default reports/<experiment>")
@click.option("--report/--no-report", "make_report", default=True, show_default=True)
def compare(sparsities, methods, experiment, force, output_dir, make_report, **options):
    """The comparison grid: dense, one-shot SparseGPT/magnitude/Wanda and iterative at each sparsity."""
    from .compare import CompareConfig, compare_command

    config = CompareConfig(sparsities=_float_list(sparsities),
                           methods=[m.strip() for m in methods.split(",") if m.strip()], **options)
    for name in ("epochs_per_iteration", "max_iterations", "max_steps", "batch_size"):
        _positive(name.replace("_", "-"), getattr(config, name))
    compare_command(config, experiment, force, output_dir, make_report)


@cli.command()
@click.option("--experiment", default=None, help="MLflow experiment to report on (default: the project's)")
@click.option("--output-dir", type=click.Path(path_type=Path), default=None, help="default reports/<experiment>")
def report(experiment, output_dir):
    """Markdown + self-contained HTML report of an experiment's comparison runs, from MLflow."""
    from .report import report_command

    report_command(experiment, output_dir)


@cli.command()
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("pretrained/opt-tiny"), show_default=True)
@click.option("--experiment", default=None, help="MLflow experiment (ignored under `mlflow run`)")
@click.option("--vocab-size", type=click.IntRange(min=300), default=4096, show_default=True)
@click.option("--hidden-size", type=click.IntRange(min=8), default=192, show_default=True)
@click.option("--num-layers", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--num-heads", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--ffn-dim", type=click.IntRange(min=8), default=768, show_default=True)
@click.option("--max-positions", type=click.IntRange(min=8), default=256, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=1800, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def pretrain(output_dir, experiment, **options):
    """Train the embedded opt-tiny from scratch on the pydocs corpus (reproduces the shipped model)."""
    from .pretrain import PretrainConfig, pretrain_command

    pretrain_command(PretrainConfig(**options), output_dir, experiment)


@cli.command()
@click.option("--model", default="opt-tiny", show_default=True)
@click.option("--dataset", default="pydocs", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seqlen", type=click.IntRange(min=2), default=None, help="default: the model's positions")
@click.option("--quick", is_flag=True, help="a smoke run in seconds: tiny sizes, figures not meaningful")
@click.option("--output-dir", type=click.Path(path_type=Path), default=None, help="default reports/bench")
@click.option("--experiment", default=None, help="MLflow experiment (ignored under `mlflow run`)")
def bench(output_dir, experiment, **options):
    """Speed and memory of the hot paths, side by side with their baselines, against targets."""
    from .bench import BenchConfig, bench_command

    bench_command(BenchConfig(**options), output_dir, experiment)


@cli.command()
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="also train small random OPTs on the CPU and compare their peak memory with the formula")
def memory(measure):
    """Peak memory per OPT size (training, SparseGPT) from the formula, checked by measurement on CPU."""
    from .memory import memory_table

    click.echo(memory_table(measure))


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else the store the run started in")
def sync(paths, tracking_uri):
    """Replay tracking calls a run kept locally while the MLflow server was unreachable."""
    from .journal import sync_command

    sync_command(list(paths), tracking_uri)


def main():
    from .distributed import silence_other_processes

    silence_other_processes()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as abort:  # Click turns KeyboardInterrupt (and our SIGTERM) into Abort
        terminated = isinstance(abort.__cause__, Terminated)
        click.echo("Terminated." if terminated else "Interrupted.", err=True)
        sys.exit(143 if terminated else 130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except UserError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except Exception as error:
        from mlflow.exceptions import MlflowException

        if not isinstance(error, MlflowException):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        click.echo(f"error: MLflow refused a request ({first[:300]}); completed iterations are in the "
                   "output directory's checkpoint", err=True)
        sys.exit(1)
    except KeyboardInterrupt as interrupt:
        click.echo("Terminated." if isinstance(interrupt, Terminated) else "Interrupted.", err=True)
        sys.exit(143 if isinstance(interrupt, Terminated) else 130)
