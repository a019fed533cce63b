"""Layer-by-layer calibration, shared by SparseGPT and Wanda (as in both reference implementations).

The calibration windows go through the embeddings once; their outputs are captured at layer 0, with
every positional and keyword argument the installed transformers passes a decoder layer (attention
mask, position ids, rotary (cos, sin), cache position, ...), once per kind of layer where a model gives
its sliding-window and full-attention layers different masks. Then per layer: one forward of the dense
layer collects input statistics of its prunable matrices, the layer is pruned, and a second forward of
the pruned layer produces the inputs of the next. The model stays where it is (CPU) and only the layer
being worked on moves to the device.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..architecture import decoder_layout, in_features, modules_outside_layers


class _StopForward(Exception):
    pass


@dataclass
class CalibrationBatch:
    hidden: torch.Tensor  # [b, seqlen, hidden]: layer 0's input, then each next layer's
    inputs: dict  # layer kind -> (args, kwargs): what the decoder passes such a layer besides the hidden states


def _own_tensors(module: nn.Module):
    return itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))


def _move_own(module: nn.Module, devices: dict | torch.device) -> dict:
    """Moves a module's own parameters and buffers (not its children's, which may be decoder layers);
    `devices` is one device or what an earlier call returned. Returns where they were."""
    before = {}
    for name, tensor in list(_own_tensors(module)):
        before[name] = tensor.device
        target = devices[name] if isinstance(devices, dict) else devices
        if name in module._parameters:
            module._parameters[name].data = tensor.data.to(target)
        else:
            module._buffers[name] = tensor.to(target)
    return before


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int
) -> list[CalibrationBatch]:
    layout = decoder_layout(model)
    firsts = {}  # layer kind -> the first layer of that kind, where its arguments are caught
    for index, kind in enumerate(layout.layer_types):
        firsts.setdefault(kind, index)
    last = max(firsts.values())
    outside = modules_outside_layers(model, layout)
    running = list(layout.layers[: last + 1])  # the forward runs up to the first layer of the last kind
    homes = [next(layer.parameters()).device for layer in running]
    captured, current = [], {}

    def catcher(kind, index):
        def catch(_module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            current[kind] = (tuple(args[1:]), kwargs)
            if index == 0:
                current["hidden"] = hidden
            if index == last:
                raise _StopForward

        return catch

    places = [_move_own(module, device) for module in outside]
    for layer in running:
        layer.to(device)
    handles = [
        layout.layers[index].register_forward_pre_hook(catcher(kind, index), with_kwargs=True)
        for kind, index in firsts.items()
    ]
    try:
        for start in range(0, windows.shape[0], batch_size):
            current.clear()
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            captured.append(CalibrationBatch(current.pop("hidden"), dict(current)))
    finally:
        for handle in handles:
            handle.remove()
        for module, place in zip(outside, places):
            _move_own(module, place)
        for layer, home in zip(running, homes):
            layer.to(home)
    return captured


def layer_output(layer: nn.Module, batch: CalibrationBatch, kind: str | None = None) -> torch.Tensor:
    """The layer's output for the batch's hidden states, with the arguments its kind of layer gets."""
    args, kwargs = batch.inputs[kind]
    out = layer(batch.hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class InputStatistics:
    """Running mean over calibration windows of X^T X (SparseGPT: H = 2/n sum X X^T) or of its diagonal
    (Wanda: the squared column norms), updated exactly as the references do: fp32, rescaled per batch."""

    def __init__(self, columns: int, device: torch.device, full: bool, moments: bool = False):
        shape = (columns, columns) if full else (columns,)
        self.full = full
        self.sum = torch.zeros(shape, device=device, dtype=torch.float32)
        self.nsamples = 0
        self.users = 1  # matrices that read these inputs (q, k and v read the same)
        # DSnoT's: each column's sum and sum of squares over every token (float64: millions of tokens), and how many
        self.moments = torch.zeros((2, columns), device=device, dtype=torch.float64) if moments else None
        self.tokens = 0

    @property
    def window_sum(self) -> torch.Tensor:
        """Each column's sum over a window's tokens, averaged over the windows (DSnoT's expected input)."""
        return (self.moments[0] / self.nsamples).float()

    @property
    def variance(self) -> torch.Tensor:
        """Each column's variance over every token (population)."""
        mean = self.moments[0] / self.tokens
        return (self.moments[1] / self.tokens - mean * mean).clamp_min(0).float()

    def or_unit(self) -> InputStatistics:
        """These statistics, or where no calibration token reached the matrix (an expert the router never chose)
        those of inputs of unit norm and no correlation, which score its weights by their magnitude: SparseGPT
        with an identity Hessian, Wanda by |W| in each row, DSnoT with nothing to correct."""
        if self.nsamples:
            return self
        columns = self.sum.shape[-1]
        self.sum = torch.eye(columns, device=self.sum.device) if self.full else torch.ones_like(self.sum)
        self.nsamples, self.tokens = 1, 1
        return self

    def for_one_matrix(self) -> InputStatistics:
        """The statistics for one of their matrices to consume in place: a copy while others still need them."""
        self.users -= 1
        if self.users == 0:
            return self
        copy = InputStatistics.__new__(InputStatistics)
        copy.full, copy.sum, copy.nsamples, copy.users = self.full, self.sum.clone(), self.nsamples, 1
        copy.moments, copy.tokens = None if self.moments is None else self.moments.clone(), self.tokens
        return copy

    def add(self, inputs: torch.Tensor, windows: int) -> None:
        """A batch of `windows` calibration windows' inputs, [windows, tokens, in] or flattened (OPT's MLP)."""
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        if self.moments is not None:
            wide = x.double()
            self.moments += torch.stack([wide.sum(dim=0), (wide * wide).sum(dim=0)])
            self.tokens += x.shape[0]
        self.sum *= self.nsamples / (self.nsamples + windows)
        self.nsamples += windows
        if self.full:
            x = x * (2.0 / self.nsamples) ** 0.5
            self.sum.addmm_(x.t(), x)
        else:
            self.sum += (x * x).sum(dim=0) / self.nsamples


class _SharedInputs:
    """Forward hooks that add each matrix's inputs to its statistics, once per input: matrices handed the
    same tensor in a forward (q, k and v; gate and up) share one statistics object, computed once."""

    def __init__(self, stats: dict):
        self.stats = stats
        self.windows = 0  # the windows of the batch being run: some layers flatten [windows, tokens] for their MLP
        self.added = {}  # id of an input tensor -> (the tensor, kept alive so its id is not reused; its statistics)

    @contextlib.contextmanager
    def batch(self, windows: int):
        self.windows = windows
        try:
            yield
        finally:
            self.added.clear()

    def hook(self, name: str):
        def add(_module, inputs, _output):
            x = inputs[0]
            if id(x) in self.added:
                shared = self.added[id(x)][1]
                if self.stats[name] is not shared:  # the first batch finds the siblings
                    self.stats[name] = shared
                    shared.users += 1
                return
            self.added[id(x)] = (x, self.stats[name])
            self.stats[name].add(x, self.windows)

        return add


@torch.no_grad()
def dense_input_norms(model: nn.Module, linears: dict, windows: torch.Tensor, device, batch_size: int = 8) -> dict:
    """Name -> the squared norm of each input column of the matrix (Wanda's statistics) in the unpruned model:
    the calibration windows once through the dense layers, one forward each, nothing pruned."""
    layout = decoder_layout(model)
    batches = capture_layer_inputs(model, windows, device, batch_size)
    norms = {}
    for index, layer in enumerate(layout.layers):
        original_device = next(layer.parameters()).device
        layer.to(device)
        prefix = f"{layout.layer_prefix}.{index}."
        targets = {name: module for name, module in linears.items() if name.startswith(prefix)}
        stats, outputs = layer_statistics(layer, targets, batches, layout.layer_types[index], device, False)
        for batch, output in zip(batches, outputs):
            batch.hidden = output
        layer.to(original_device)
        norms.update({name: stat.or_unit().sum for name, stat in stats.items()})
    return norms


def layer_statistics(
    layer, targets: dict, batches: list, kind, device, full: bool, moments: bool = False
) -> tuple[dict, list]:
    """One forward of the layer over the batches, gathering its matrices' input statistics on the way:
    (name -> InputStatistics, the layer's output per batch)."""
    stats = {name: InputStatistics(in_features(m), device, full, moments) for name, m in targets.items()}
    gather = _SharedInputs(stats)
    handles = [module.register_forward_hook(gather.hook(name)) for name, module in targets.items()]
    outputs = []
    try:
        for batch in batches:
            with gather.batch(batch.hidden.shape[0]):
                outputs.append(layer_output(layer, batch, kind))
    finally:
        for handle in handles:
            handle.remove()
    return gather.stats, outputs


@dataclass
class LayerRecord:
    layer: int
    seconds: dict = field(default_factory=dict)  # phase -> seconds
    relative_output_error: float = 0.0  # ||pruned out - dense out||^2 / ||dense out||^2


def layer_table_csv(records: list) -> str:
    """One row per decoder layer: seconds per phase, total, and the relative output error."""
    phases = sorted({phase for r in records for phase in r.seconds})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["layer", *[f"{p}_seconds" for p in phases], "total_seconds", "relative_output_error"])
    for r in records:
        writer.writerow(
            [
                r.layer,
                *[f"{r.seconds.get(p, 0.0):.4f}" for p in phases],
                f"{sum(r.seconds.values()):.4f}",
                f"{r.relative_output_error:.6g}",
            ]
        )
    return out.getvalue()


@torch.no_grad()
def prune_sequentially(
    model: nn.Module,
    linears: dict,
    windows: torch.Tensor,
    device: torch.device,
    full_statistics: bool,
    prune_matrix: Callable[[str, nn.Module, InputStatistics, dict], None],
    batch_size: int = 8,
    progress: bool = True,
    moments: bool = False,
) -> list[LayerRecord]:
    """Runs the calibration windows layer by layer and calls `prune_matrix(name, module, stats, timings)`
    for every prunable matrix of the layer, between the dense and the pruned forward."""
    layout = decoder_layout(model)
    batches = capture_layer_inputs(model, windows, device, batch_size)
    records = []
    for index, layer in enumerate(layout.layers):
        record, kind = LayerRecord(index), layout.layer_types[index]
        started = time.perf_counter()
        original_device = next(layer.parameters()).device
        layer.to(device)
        prefix = f"{layout.layer_prefix}.{index}."
        targets = {name: module for name, module in linears.items() if name.startswith(prefix)}
        stats, dense_outputs = layer_statistics(layer, targets, batches, kind, device, full_statistics, moments)
        record.seconds["statistics"] = time.perf_counter() - started
        for name, module in targets.items():
            prune_matrix(name, module, stats.pop(name).for_one_matrix().or_unit(), record.seconds)
        started = time.perf_counter()
        error, norm = 0.0, 0.0
        for batch, dense in zip(batches, dense_outputs):
            pruned = layer_output(layer, batch, kind)
            error += float((pruned.float() - dense.float()).pow(2).sum())
            norm += float(dense.float().pow(2).sum())
            batch.hidden = pruned
        record.relative_output_error = error / max(norm, 1e-30)
        record.seconds["forward"] = time.perf_counter() - started
        layer.to(original_device)
        del dense_outputs
        records.append(record)
        if progress:
            total = sum(record.seconds.values())
            print(
                f"  layer {index}: {total:.2f}s, relative output error {record.relative_output_error:.4g}", flush=True
            )
    return records
