"""Recovery beyond cross-entropy: distillation from the dense model, weight rewinding, and the
random-mask control."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from loading import load_model_and_tokenizer

from pipeline.config import PruneConfig, TrainConfig
from pipeline.distillation import Distillation, distillation_loss, kd_loss, next_token_targets
from pipeline.pruning import prune_model
from pipeline.pruning.magnitude import magnitude_prune_layerwise
from pipeline.pruning.masks import model_masks, prunable_linears, sparsity_of
from pipeline.training import train_keeping_masks


@pytest.fixture()
def tiny(tiny_model_dir):
    return load_model_and_tokenizer(str(tiny_model_dir))


@pytest.fixture()
def blocks(tiny, corpus_dir):
    from pipeline.data import load_corpus, training_blocks

    return training_blocks(load_corpus(f"text:{corpus_dir}"), tiny[1], 32)


def nudged(model, seed=1, scale=0.05):
    """Another model of the same shape: a teacher that differs from the student."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return other


def test_kd_loss_is_temperature_squared_kl_div():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    for temperature in (1.0, 2.0, 4.0):
        expected = temperature**2 * F.kl_div(
            F.log_softmax(student / temperature, -1).reshape(-1, 11),
            F.log_softmax(teacher / temperature, -1).reshape(-1, 11),
            reduction="batchmean",
            log_target=True,
        )
        assert kd_loss(student, teacher, temperature) == pytest.approx(float(expected), rel=1e-6)
    assert float(kd_loss(student, student, 2.0)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_loss_and_its_gradient_equal_cross_entropy_plus_kl_div(temperature):
    """The one-pass loss against autograd through F.cross_entropy and F.kl_div in float64, over logits wide
    enough that the pass takes several chunks, the last one partial."""
    generator = torch.Generator().manual_seed(0)
    batch, vocabulary, alpha = torch.randint(0, 4096, (2, 300), generator=generator), 4096, 0.3
    student = torch.randn(2, 300, vocabulary, generator=generator) * 3
    teacher = torch.randn(2, 300, vocabulary, generator=generator) * 3
    ours = student.clone().requires_grad_()
    loss, ce, kd = distillation_loss(ours, teacher, next_token_targets(batch), alpha, temperature)
    loss.backward()
    reference = student.double().requires_grad_()
    expected_ce = F.cross_entropy(reference[:, :-1].reshape(-1, vocabulary), batch[:, 1:].reshape(-1))
    expected_kd = temperature**2 * F.kl_div(
        F.log_softmax(reference / temperature, -1).reshape(-1, vocabulary),
        F.log_softmax(teacher.double() / temperature, -1).reshape(-1, vocabulary),
        reduction="batchmean",
        log_target=True,
    )
    expected = (1 - alpha) * expected_ce + alpha * expected_kd
    expected.backward()
    assert float(ce) == pytest.approx(expected_ce.item(), rel=1e-6)
    assert float(kd) == pytest.approx(expected_kd.item(), rel=1e-6)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(ours.grad.double(), reference.grad, rtol=1e-4, atol=1e-9)
    assert reference.grad.abs().max() > 1e-4  # a gradient worth comparing


def test_objective_on_a_fixed_batch_equals_its_definition(tiny):
    model, tokenizer = tiny
    teacher = nudged(model)
    batch = torch.randint(3, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(distill="squarehead", distill_alpha=0.3, distill_temperature=2.0)
    loss, parts = Distillation(teacher, config)(model, batch)
    with torch.no_grad():
        s = model(batch, labels=batch, output_hidden_states=True)
        t = teacher(batch, output_hidden_states=True)
    kl = (
        F.kl_div(
            F.log_softmax(s.logits / 2, -1).reshape(-1, s.logits.shape[-1]),
            F.log_softmax(t.logits / 2, -1).reshape(-1, s.logits.shape[-1]),
            reduction="batchmean",
            log_target=True,
        )
        * 4
    )
    layers = [
        ((hs[b] - ht[b]) ** 2).sum() / (ht[b] ** 2).sum()  # per layer and sequence
        for hs, ht in zip(s.hidden_states[1:], t.hidden_states[1:])
        for b in range(batch.shape[0])
    ]
    assert len(layers) == model.config.num_hidden_layers * batch.shape[0]
    assert float(parts["ce_loss"]) == pytest.approx(float(s.loss), rel=1e-6)
    assert float(parts["kd_loss"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(parts["layer_loss"]) == pytest.approx(float(sum(layers) / len(layers)), rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * float(s.loss) + 0.3 * float(kl) + float(parts["layer_loss"]), rel=1e-5)


def test_alpha_zero_trains_bit_identically_to_cross_entropy(tiny, blocks):
    model, _ = tiny
    magnitude_prune_layerwise(prunable_linears(model), 0.5)
    start = copy.deepcopy(model)
    teacher = nudged(model)
    plain, distilled = copy.deepcopy(start), copy.deepcopy(start)
    config = TrainConfig(lr=2e-3, batch_size=4, max_steps=3)
    train_keeping_masks(plain, prunable_linears(plain), blocks, config, show_progress=False)
    train_keeping_masks(
        distilled,
        prunable_linears(distilled),
        blocks,
        TrainConfig(lr=2e-3, batch_size=4, max_steps=3, distill="logits", distill_alpha=0.0),
        teacher=teacher,
        show_progress=False,
    )
    for (name, a), b in zip(plain.state_dict().items(), distilled.state_dict().values()):
        assert torch.equal(a, b), name
    changed = copy.deepcopy(start)
    train_keeping_masks(
        changed,
        prunable_linears(changed),
        blocks,
        TrainConfig(lr=2e-3, batch_size=4, max_steps=3, distill="logits", distill_alpha=0.5),
        teacher=teacher,
        show_progress=False,
    )
    assert not all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), changed.state_dict().values()))


@pytest.mark.parametrize("distill", ["none", "logits", "squarehead"])
def test_masks_stay_exact_under_every_recovery(tiny, blocks, distill):
    model, _ = tiny
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.7)
    before = model_masks(linears)
    logged = []
    train_keeping_masks(
        model,
        linears,
        blocks,
        TrainConfig(lr=3e-3, batch_size=4, max_steps=4, log_every=2, distill=distill, weight_decay=0.1),
        teacher=nudged(model),
        on_log=lambda step, metrics: logged.append(metrics),
        show_progress=False,
    )
    after = model_masks(linears)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert sparsity_of(linears) == pytest.approx(0.7, abs=1e-3)
    parts = {"none": set(), "logits": {"ce_loss", "kd_loss"}, "squarehead": {"ce_loss", "kd_loss", "layer_loss"}}
    assert set(logged[0]) == {"loss", "lr"} | parts[distill]


def test_rewinding_resets_every_surviving_weight_right_after_pruning(tmp_path, tiny_model_dir, corpus_dir):
    from pipeline.config import IterativeConfig
    from pipeline.imp import ImpRun
    from pipeline.settings import build
    from pipeline.tracking import NullTracker

    config = build(
        IterativeConfig,
        {
            "model": str(tiny_model_dir),
            "dataset": f"text:{corpus_dir}",
            "seqlen": 32,
            "target_sparsity": 0.36,
            "prune_percentage": 0.2,
            "epochs_per_iteration": 1,
            "batch_size": 4,
            "max_steps": 3,
            "lr": 3e-3,
            "rewind": "dense",
            "save_model": False,
        },
    )
    seen = {}

    class Watched(ImpRun):  # the run's own rewind phase, with the weights read on either side of it
        def rewind(self, k):
            seen[f"before {k}"] = {n: m.weight.detach().clone() for n, m in self.linears.items()}
            super().rewind(k)
            seen[f"after {k}"] = {k2: v.detach().clone() for k2, v in self.model.state_dict().items()}

    imp = Watched.create(config, NullTracker(), tmp_path / "run")
    assert imp.targets == [pytest.approx(0.2), pytest.approx(0.36)]
    dense = {k: v.detach().clone() for k, v in imp.model.state_dict().items()}
    linears = imp.linears
    imp.run()
    pruned_at_2 = seen["before 2"]
    for name in linears:
        after = seen["after 2"][name + ".weight"]
        kept = pruned_at_2[name] != 0
        assert torch.equal(after[kept], dense[name + ".weight"][kept]), name  # survivors: the dense values
        assert (after[~kept] == 0).all(), name  # the new mask kept
        assert not torch.equal(pruned_at_2[name][kept], dense[name + ".weight"][kept])  # they had been trained
    for key, value in seen["after 2"].items():
        if not any(key == n + ".weight" for n in linears):
            assert torch.equal(value, dense[key]), key  # everything else rewound as well


def test_rewind_through_the_iterative_job(tmp_path, tiny_model_dir, corpus_dir, mlflow_store):
    from pipeline.api import iterative_training_wrapper

    common = {
        "model_name": str(tiny_model_dir),
        "dataset": f"text:{corpus_dir}",
        "target_sparsity": 0.488,
        "prune_percentage": 0.2,
        "epochs_per_iteration": 1,
        "batch_size": 4,
        "lr": 2e-3,
        "train_steps": 3,
        "seqlen": 32,
        "save_model": False,
        "experiment": "rewind",
    }
    runs = {
        rewind: iterative_training_wrapper({**common, "rewind": rewind, "output_dir": str(tmp_path / rewind)})
        for rewind in ("none", "dense", "iteration:1")
    }
    finals = {rewind: history[-1]["ppl_after_train"] for rewind, history in runs.items()}
    assert len(set(finals.values())) == 3  # three different runs
    assert [round(h["sparsity"], 3) for h in runs["dense"]] == [0.0, 0.2, 0.36, 0.488]
    assert (tmp_path / "iteration:1" / "rewind-iteration-1.pt").exists()  # kept for a resume


def test_random_mask_is_exact_reproducible_and_monotone(tiny):
    model, tokenizer = tiny

    def pruned(seed, sparsity=0.5, pattern="unstructured", start=None):
        copy_ = copy.deepcopy(start or model)
        prune_model(
            copy_,
            PruneConfig(
                method="random", sparsity=None if pattern != "unstructured" else sparsity, pattern=pattern, seed=seed
            ),
        )
        return copy_, model_masks(prunable_linears(copy_))

    first, masks = pruned(0)
    _, again = pruned(0)
    _, other = pruned(1)
    for name, module in prunable_linears(first).items():
        assert int((module.weight == 0).sum()) == module.weight.numel() // 2, name
        assert torch.equal(masks[name], again[name]), name
        assert not torch.equal(masks[name], other[name]), name
    deeper, deeper_masks = pruned(0, 0.8, start=first)
    for name in masks:  # a zero stays a zero
        assert not (deeper_masks[name] & ~masks[name]).any()
    assert sparsity_of(prunable_linears(deeper)) == pytest.approx(0.8, abs=1e-3)
    _, n_m = pruned(0, pattern="2:4")
    assert all(((~mask).reshape(mask.shape[0], -1, 4).sum(2) == 2).all() for mask in n_m.values())
    # the mask is random, not magnitude's
    magnitude = copy.deepcopy(model)
    magnitude_prune_layerwise(prunable_linears(magnitude), 0.5)
    overlap = [float((masks[n] == m.weight.ne(0)).float().mean()) for n, m in prunable_linears(magnitude).items()]
    assert max(overlap) < 0.6


def test_a_finished_training_leaves_no_optimizer_or_accelerator_alive_without_a_garbage_collection(tiny, blocks):
    """Reference counting alone frees them (no full gc.collect after each training: 0.5 s in a large process)."""
    import gc

    from accelerate import Accelerator

    model, _ = tiny
    linears = prunable_linears(model)
    magnitude_prune_layerwise(linears, 0.5)
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            train_keeping_masks(
                model, linears, blocks, TrainConfig(lr=1e-3, batch_size=4, max_steps=2), show_progress=False
            )
        alive = [type(o).__name__ for o in gc.get_objects() if isinstance(o, (torch.optim.Optimizer, Accelerator))]
    finally:
        gc.enable()
    assert alive == []
