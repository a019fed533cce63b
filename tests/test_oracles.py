"""SparseGPT and Wanda against independent oracles written from the papers: the textbook OBS
sweep, the Hessian and the column norms computed directly, and layer-by-layer calibration on pruned inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from loading import load_model_and_tokenizer
from torch import nn

from pipeline.config import PruneConfig
from pipeline.pruning import prune_model
from pipeline.pruning.masks import prunable_linears
from pipeline.pruning.sequential import InputStatistics, prune_sequentially
from pipeline.pruning.sparsegpt import sparsegpt_prune_matrix

DAMPING = 0.01  # SparseGPT's 1% of the Hessian's mean diagonal


def correlated_problem(rows=24, columns=64, samples=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator, dtype=torch.float64) / columns**0.5
    X = torch.randn(samples, columns, generator=generator, dtype=torch.float64) @ mixing
    W = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    return W, X, 2.0 / samples * X.T @ X


def remaining_inverse_diagonals(H: torch.Tensor) -> torch.Tensor:
    """[H_F^-1]_ii for F = {i, ..., n}: the inverse Hessian of the columns not yet visited, read at the column
    being visited, by the Schur complement after each column (Gaussian elimination of H^-1)."""
    inverse = torch.linalg.inv(H)
    diagonals = torch.empty(H.shape[0], dtype=H.dtype)
    for i in range(H.shape[0]):
        diagonals[i] = inverse[i, i]
        inverse = inverse - torch.outer(inverse[:, i], inverse[i, :]) / inverse[i, i]
    return diagonals


def obs_oracle(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.0,
    n_m: tuple | None = None,
    block_zeros: list | None = None,
    blocksize: int | None = None,
) -> torch.Tensor:
    """The textbook optimal-brain-surgeon sweep: one column at a time, unblocked, with H^-1 updated by the
    Schur complement after each column. The mask is chosen by w^2 / [H_F^-1]_ii, over the whole matrix
    at once, per block (the given numbers of new zeros, when each block is reached), or per N:M group."""
    W, H = W.clone().double(), H.clone().double()
    H += DAMPING * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    rows, columns = W.shape
    kept = W != 0  # an earlier mask: these zeros stay zeros
    d = remaining_inverse_diagonals(H)
    inverse = torch.linalg.inv(H)
    mask = torch.zeros_like(W, dtype=torch.bool)  # True: pruned

    def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        chosen[torch.argsort(scores.reshape(-1), stable=True)[:k]] = True
        return chosen.reshape(scores.shape)

    if n_m is None and block_zeros is None:
        mask = lowest(W**2 / d, round(sparsity * W.numel()))
    for i in range(columns):
        if block_zeros is not None and i % blocksize == 0:
            block = slice(i, min(i + blocksize, columns))
            scores = (W[:, block] ** 2 / d[block]).masked_fill(~kept[:, block], -float("inf"))
            mask[:, block] = lowest(scores, block_zeros[i // blocksize])
        if n_m is not None and i % n_m[1] == 0:
            group = slice(i, i + n_m[1])
            scores = W[:, group] ** 2 / d[group]
            mask[:, group] = torch.zeros_like(scores, dtype=torch.bool).scatter_(
                1, torch.topk(scores, n_m[0], dim=1, largest=False).indices, True
            )
        error = torch.where(mask[:, i], W[:, i], torch.zeros_like(W[:, i]))  # what pruning removes
        W[:, i:] -= torch.outer(error / inverse[i, i], inverse[i, i:])  # OBS: compensate on the rest
        W[:, i] = torch.where(mask[:, i], torch.zeros_like(W[:, i]), W[:, i])
        inverse = inverse - torch.outer(inverse[:, i], inverse[i, :]) / inverse[i, i]
    return W


def shares(total: int, weights: list) -> list:
    """`total` split in proportion to `weights`, by cumulative rounding (as the project documents)."""
    cumulative, edges = 0.0, [0]
    for weight in weights:
        cumulative += weight
        edges.append(round(total * cumulative / sum(weights)))
    return [b - a for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_is_the_obs_sweep_unstructured(seed):
    W, _, H = correlated_problem(seed=seed)
    ours, _ = sparsegpt_prune_matrix(W.float(), H.float(), 0.5, blocksize=W.shape[1])
    expected = obs_oracle(W, H, 0.5)
    assert torch.equal(ours == 0, expected == 0)  # the same mask
    assert torch.allclose(ours.double(), expected, atol=1e-5, rtol=0)  # the same updated weights


@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_is_the_obs_sweep_2_4(seed):
    W, _, H = correlated_problem(seed=seed)
    ours, _ = sparsegpt_prune_matrix(W.float(), H.float(), 0.0, prune_n=2, prune_m=4, blocksize=32)
    expected = obs_oracle(W, H, n_m=(2, 4))
    assert torch.equal(ours == 0, expected == 0)
    assert torch.allclose(ours.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("blocksize", [128, 32])
def test_blocked_sparsegpt_equals_the_sweep_with_each_blocks_exact_share(blocksize):
    """The one documented departure from the reference: each block gets its exact share of the matrix's
    zeros (in proportion to its remaining weights) where the reference thresholds at sorted[int(s n)]."""
    W, _, H = correlated_problem(rows=16, columns=256)
    W[:, :40] *= torch.rand(16, 40, generator=torch.Generator().manual_seed(3), dtype=W.dtype) > 0.3  # a mask
    columns = W.shape[1]
    blocks = [W[:, i : i + blocksize] for i in range(0, columns, blocksize)]
    new = round(0.6 * W.numel()) - int((W == 0).sum())
    per_block = [int((b == 0).sum()) + k for b, k in zip(blocks, shares(new, [int((b != 0).sum()) for b in blocks]))]
    ours, _ = sparsegpt_prune_matrix(W.float(), H.float(), 0.6, blocksize=blocksize)
    expected = obs_oracle(W, H, block_zeros=per_block, blocksize=blocksize)
    assert torch.equal(ours == 0, expected == 0)
    assert torch.allclose(ours.double(), expected, atol=1e-5, rtol=0)
    assert int((ours == 0).sum()) == round(0.6 * W.numel())


@pytest.mark.parametrize("order", [700, 1537])
def test_the_inverse_hessians_factor_is_the_cholesky_factor_of_the_inverse(order):
    """H^-1 = U^T U with U upper triangular: from LAPACK directly at and below 768 columns, from halves (the
    blocked factor and inverse) above it; 1537 splits unevenly and twice."""
    from pipeline.pruning.sparsegpt import _upper_cholesky_of_inverse

    _, _, H = correlated_problem(rows=1, columns=order, samples=2 * order)
    dampened = H + DAMPING * torch.mean(torch.diag(H)) * torch.eye(order, dtype=H.dtype)
    expected = torch.linalg.cholesky(torch.linalg.inv(dampened), upper=True)
    ours = _upper_cholesky_of_inverse(H.clone(), DAMPING)
    assert torch.equal(ours, ours.triu())
    assert torch.allclose(ours, expected, atol=1e-9 * expected.abs().max(), rtol=0)


@pytest.fixture()
def two_layers(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    windows = torch.randint(3, len(tokenizer), (6, 32), generator=torch.Generator().manual_seed(0))
    return model, windows


def inputs_of(model: nn.Module, module: nn.Module, windows: torch.Tensor) -> list:
    """What `module` receives when the whole model runs on each window: [tokens, in] per window."""
    seen = []
    tokens = windows.shape[1]
    handle = module.register_forward_hook(  # OPT's MLP sees [windows * tokens, in]
        lambda _m, inputs, _o: seen.extend(inputs[0].detach().reshape(-1, tokens, inputs[0].shape[-1]))
    )
    with torch.no_grad():
        model(windows)
    handle.remove()
    return seen


def recorded_statistics(model, windows, full: bool, prune) -> dict:
    """name -> the statistics prune_sequentially hands each matrix, while `prune(name, module)` prunes it."""
    recorded = {}

    def prune_matrix(name, module, stats, seconds):
        recorded[name] = stats.sum.clone()
        prune(name, module)

    prune_sequentially(
        model, prunable_linears(model), windows, torch.device("cpu"), full, prune_matrix, batch_size=4, progress=False
    )
    return recorded


def halve(name, module):
    """A pruning rule of the test's own: zero every other input column."""
    with torch.no_grad():
        module.weight[:, ::2] = 0


def test_hessians_are_two_over_n_sum_xtx_of_the_pruned_previous_layers(two_layers):
    model, windows = two_layers
    dense = copy.deepcopy(model)
    stats = recorded_statistics(model, windows, True, halve)
    for name in stats:  # layer 0 sees the dense embeddings; layer 1 the outputs of the pruned layer 0
        reference = copy.deepcopy(dense)
        if ".layers.1." in name:
            for other, module in prunable_linears(reference).items():
                if ".layers.0." in other:
                    halve(other, module)
        X = inputs_of(reference, prunable_linears(reference)[name], windows)
        expected = 2.0 / len(X) * sum(x.double().T @ x.double() for x in X)  # n: the calibration windows
        assert torch.allclose(stats[name].double(), expected, rtol=1e-4, atol=1e-5), name
        if ".layers.1." in name:  # and the dense inputs would have given another Hessian
            X_dense = inputs_of(dense, prunable_linears(dense)[name], windows)
            other = 2.0 / len(X_dense) * sum(x.double().T @ x.double() for x in X_dense)
            assert not torch.allclose(stats[name].double(), other, rtol=1e-2, atol=1e-3), name


def test_wanda_uses_the_column_norms_of_the_captured_inputs(two_layers):
    model, windows = two_layers
    reference = copy.deepcopy(model)
    stats = recorded_statistics(copy.deepcopy(model), windows, False, lambda name, module: None)
    expected_masks = {}
    for name, module in prunable_linears(reference).items():
        X = inputs_of(reference, module, windows)
        squared_norms = sum((x.double() ** 2).sum(dim=0) for x in X) / len(X)  # ||X_j||^2, per window
        assert torch.allclose(stats[name].double(), squared_norms, rtol=1e-5), name
        score = module.weight.detach().abs().double() * squared_norms.sqrt()  # |W| * ||X_j||_2
        order = torch.argsort(score, dim=1, stable=True)
        mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order[:, : score.shape[1] // 2], True)
        expected_masks[name] = mask
    prune_model(model, PruneConfig(method="wanda", sparsity=0.5), windows)  # dense inputs: nothing pruned before
    for name, module in prunable_linears(model).items():
        if ".layers.0." in name:  # layer 1's inputs come from the pruned layer 0
            assert torch.equal(module.weight == 0, expected_masks[name]), name


def test_matrices_handed_one_input_share_its_statistics_and_each_consumes_its_own_copy(two_layers, monkeypatch):
    """q, k and v read one tensor: its X^T X is computed once per batch, and each matrix may consume what it
    is handed in place (SparseGPT does) without changing what its siblings get."""
    model, windows = two_layers
    dense = copy.deepcopy(model)
    added = []
    add = InputStatistics.add
    monkeypatch.setattr(InputStatistics, "add", lambda self, x, n: (added.append(x.shape[-1]), add(self, x, n))[1])
    recorded = {}

    def consume(name, module, stats, seconds):
        recorded[name] = stats.sum.clone()
        stats.sum.zero_()

    prune_sequentially(
        model, prunable_linears(model), windows, torch.device("cpu"), True, consume, batch_size=4, progress=False
    )
    for name, module in prunable_linears(dense).items():
        X = inputs_of(dense, module, windows)  # nothing was pruned: every layer sees the dense inputs
        expected = 2.0 / len(X) * sum(x.double().T @ x.double() for x in X)
        assert torch.allclose(recorded[name].double(), expected, rtol=1e-4, atol=1e-5), name
    layers, batches = 2, 2  # 6 windows in batches of 4
    assert len(added) == layers * batches * 4  # one input for q, k, v; out_proj's; fc1's; fc2's
