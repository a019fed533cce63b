"""RIA and DSnoT, each against an independent computation: RIA's score formula on a hand-made matrix and its mask
on a real model's captured inputs; DSnoT's prune-and-grow cycles re-run row by row in plain Python, its sparsity
exact after every cycle, its statistics those of the captured inputs; both prune a real model exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from test_oracles import inputs_of, two_layers  # noqa: F401  (a fixture)

from pipeline.config import PruneConfig
from pipeline.errors import ConfigError
from pipeline.pruning import prune_model
from pipeline.pruning.dsnot import MAX_CYCLES, UPDATE_THRESHOLD, dsnot_mask, row_errors
from pipeline.pruning.masks import prunable_linears, sparsity_of
from pipeline.pruning.ria import ria_prune_matrix, ria_scores
from pipeline.pruning.sequential import prune_sequentially


def test_the_ria_score_is_the_relative_importance_times_the_root_of_the_input_norm():
    weight = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, -1.5]])
    norm_sq = torch.tensor([4.0, 16.0, 81.0])  # ||X_j||_2 = 2, 4, 9
    # |W_ij| / row sum + |W_ij| / column sum, by hand: rows sum to 3 and 5, columns to 4, 2.5 and 1.5
    relative = torch.tensor([[1 / 3 + 1 / 4, 2 / 3 + 2 / 2.5, 0.0], [3 / 5 + 3 / 4, 0.5 / 5 + 0.5 / 2.5, 1.5 / 5 + 1]])
    expected = relative * torch.tensor([2.0, 4.0, 9.0]) ** 0.5
    assert torch.allclose(ria_scores(weight, norm_sq), expected, rtol=1e-6)
    # half of each row: the lowest score in it; the zero already there counts toward the first row's share
    pruned = ria_prune_matrix(weight, norm_sq, 0.5)
    assert torch.equal(pruned == 0, torch.tensor([[True, False, True], [False, True, False]]))


def test_ria_prunes_each_row_by_its_scores_from_the_captured_inputs(two_layers):  # noqa: F811
    model, windows = two_layers
    reference = copy.deepcopy(model)
    expected = {}
    for name, module in prunable_linears(reference).items():
        if ".layers.0." not in name:  # layer 1's inputs come from the pruned layer 0
            continue
        X = inputs_of(reference, module, windows)
        norm_sq = sum((x.double() ** 2).sum(dim=0) for x in X) / len(X)
        W = module.weight.detach().double().abs()
        score = (W / W.sum(1, keepdim=True) + W / W.sum(0, keepdim=True)) * norm_sq.sqrt() ** 0.5
        order = torch.argsort(score, dim=1, stable=True)
        expected[name] = torch.zeros_like(W, dtype=torch.bool).scatter_(1, order[:, : W.shape[1] // 2], True)
    prune_model(model, PruneConfig(method="ria", sparsity=0.5), windows)
    for name, mask in expected.items():
        assert torch.equal(prunable_linears(model)[name].weight == 0, mask), name


def dsnot_by_hand(W, norm_sq, window_sum, variance, per_row, cycles):
    """DSnoT row by row: Wanda's lowest `per_row` pruned, then per cycle one revival and one pruning chosen by
    scanning the row's remaining candidates, until |e| <= 0.1, no candidate, or `cycles`."""
    W, s = W.double(), window_sum.double()
    wanda = W.abs() * norm_sq.double().sqrt()
    prune = torch.zeros_like(W, dtype=torch.bool)
    for i in range(W.shape[0]):
        start = sorted(range(W.shape[1]), key=lambda j: (wanda[i, j].item(), j))[:per_row]
        pruned, kept = set(start), set(range(W.shape[1])) - set(start)
        c = [(W[i, j] * s[j]).item() for j in range(W.shape[1])]
        revival = [c[j] / max(variance[j].item(), 1e-12) for j in range(W.shape[1])]
        revivable, prunable = set(pruned), set(kept)  # fixed queues: revived never re-pruned, nor the reverse
        e = sum(c[j] for j in pruned)
        for _ in range(cycles):
            if abs(e) <= UPDATE_THRESHOLD:
                break
            sign = 1 if e > 0 else -1
            grow = [j for j in revivable if sign * c[j] > 0]
            cut = [j for j in prunable if sign * c[j] < 0]
            if not grow or not cut:
                break
            g = max(grow, key=lambda j: sign * revival[j])
            p = min(cut, key=lambda j: wanda[i, j].item())
            revivable.discard(g), prunable.discard(p)
            pruned.discard(g), pruned.add(p)
            e += c[p] - c[g]
        prune[i, sorted(pruned)] = True
    return prune


@pytest.fixture(scope="module")
def statistics():
    """A matrix of 48 inputs and the statistics of 600 tokens in 6 windows of non-zero mean."""
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(12, 48, generator=generator) * 0.05
    x = torch.randn(600, 48, generator=generator) * torch.rand(48, generator=generator) + 0.3
    return W, (x * x).sum(0) / 6, x.sum(0) / 6, x.var(0, unbiased=False)


@pytest.mark.parametrize("cycles", [0, 1, 2, 5, MAX_CYCLES])
def test_dsnot_is_its_cycles_rerun_by_hand_and_the_sparsity_is_exact_after_each(statistics, cycles):
    W, norm_sq, window_sum, variance = statistics
    ours = dsnot_mask(W, norm_sq, window_sum, variance, 0.5, max_cycles=cycles)
    assert torch.equal(ours, dsnot_by_hand(W, norm_sq, window_sum, variance, 24, cycles))
    assert (ours.sum(dim=1) == 24).all()  # every row keeps its share after every cycle


def test_dsnot_lowers_the_expected_output_error_of_wandas_mask(statistics):
    W, norm_sq, window_sum, variance = statistics
    errors = [
        float(row_errors(W, window_sum, dsnot_mask(W, norm_sq, window_sum, variance, 0.5, max_cycles=k)).abs().sum())
        for k in (0, 1, 5, MAX_CYCLES)
    ]
    assert errors[1] < errors[0] and errors[-1] < errors[0] / 2, errors
    # a weight that was zero before is never revived
    W = W.clone()
    W[:, :10] = 0
    assert dsnot_mask(W, norm_sq, window_sum, variance, 0.5)[:, :10].all()


def test_dsnot_reads_the_sums_and_variances_of_the_captured_inputs(two_layers):  # noqa: F811
    model, windows = two_layers
    reference = copy.deepcopy(model)
    recorded = {}

    def keep(name, module, stats, seconds):
        recorded[name] = (stats.window_sum.clone(), stats.variance.clone())

    prune_sequentially(model, prunable_linears(model), windows, torch.device("cpu"), False, keep, 4, False, True)
    for name, module in prunable_linears(reference).items():
        X = torch.stack(inputs_of(reference, module, windows)).double()  # [windows, tokens, in]
        assert torch.allclose(recorded[name][0].double(), X.sum(dim=1).mean(dim=0), rtol=1e-4, atol=1e-4), name
        flat = X.reshape(-1, X.shape[-1])
        assert torch.allclose(recorded[name][1].double(), flat.var(dim=0, unbiased=False), rtol=1e-4), name


@pytest.mark.parametrize("method", ["ria", "dsnot"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_ria_and_dsnot_prune_a_model_to_the_exact_sparsity(two_layers, method, sparsity):  # noqa: F811
    model, windows = two_layers
    prune_model(model, PruneConfig(method=method, sparsity=sparsity), windows)
    for name, module in prunable_linears(model).items():
        assert int((module.weight == 0).sum()) == round(sparsity * module.weight.numel()), name
    assert sparsity_of(prunable_linears(model)) == pytest.approx(sparsity, abs=1e-3)


def test_dsnot_refuses_an_n_m_pattern_that_ria_takes():
    with pytest.raises(ConfigError, match="prunes unstructured only"):
        PruneConfig(method="dsnot", pattern="2:4")
    assert PruneConfig(method="ria", pattern="2:4").n_m == (2, 4)
