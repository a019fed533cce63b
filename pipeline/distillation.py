"""Recovery losses: plain cross-entropy, and distillation from a frozen teacher (the dense model).

    logits:      (1 - a) CE + a T^2 KL(softmax(t / T) || softmax(s / T))      (Hinton et al. 2015)
    squarehead:  the logits loss + the mean over decoder layers (and sequences) of ||h_s - h_t||^2 / ||h_t||^2
                 (Kurtic et al. 2023, "Sparse fine-tuning for inference acceleration of LLMs"), each sequence
                 normalized by its own norm, so the loss is the same however a batch is split over processes

The teacher runs without gradients, in the student's autocast (the training dtype). KL and CE are
averaged over tokens and computed together in one pass over the logits; with a = 0 the CE is the model's
own loss, so such training is exactly plain cross-entropy training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig

# Rows of [tokens, vocabulary] float32 worked on at once: on a CPU a chunk whose share per core stays in its
# L2 cache (over the whole batch's logits at once the losses make a dozen passes through memory; measured on
# opt-tiny, 16 x 256 tokens x 4096 words, T = 2, forward and backward: 62 ms in chunks of 4 MiB, 50 ms in
# chunks of 1 MiB, 52 ms in 512 KiB); on a GPU a bound on the temporary memory.
CHUNK_BYTES = {"cpu": 1 << 20, "cuda": 256 << 20}
# the loss's working set: the student's chunk in float32, its two log-softmaxes, the teacher's and its softmax
LIVE_CHUNKS = 5
IGNORED = -100  # a target that counts in no loss (the last position of each sequence), as in transformers


def _losses_of_rows(student, teacher, targets, counted, gradient, temperature, kd_scale, ce_scale):
    """(sum of KL, sum of CE) over some rows of logits, their gradient written into `gradient`. In place
    where it can be, and in a function of its own so that its temporaries die with it: at most
    LIVE_CHUNKS chunks live at once."""
    s_float, t_float = student.float(), teacher.float()
    if temperature != 1:  # x / 1 is x: two passes over the chunk saved in the common case
        s_float, t_float = s_float / temperature, t_float / temperature
    s = torch.log_softmax(s_float, dim=-1)
    t = torch.log_softmax(t_float, dim=-1)
    p_t = t.exp()
    # a float32 sum per chunk (torch sums in cascades), the chunks' sums added in float64
    kl = t.sub_(s).mul_(p_t).sum().double()
    target, weight = targets.clamp_min(0).unsqueeze(1), counted.unsqueeze(1).float()
    if temperature == 1:  # softmax(s / T) is the CE's softmax(s): its logarithm is at hand
        p, log_p_target = None, s.gather(1, target)
    else:  # the CE needs softmax(s) whole (its gradient) but its logarithm only at the targets
        p = torch.softmax(student.float(), dim=-1)
        log_p_target = p.gather(1, target).log()
    ce = -(log_p_target * weight).sum(dtype=torch.float64)
    p_s = s.exp_()  # s is spent
    torch.sub(p_s, p_t, out=gradient).mul_(kd_scale).addcmul_(p_s if p is None else p, weight * ce_scale)
    gradient.scatter_add_(1, target, weight * -ce_scale)
    return kl, ce


class _DistillationLoss(torch.autograd.Function):
    """(1 - a) CE + a T^2 KL(softmax(t / T) || softmax(s / T)), each averaged over its tokens, in one pass
    over the logits, chunk by chunk; CE and KL come back too, as detached parts. The gradient with respect
    to the student's logits is formed on the way:
        a T / n (softmax(s / T) - softmax(t / T)) + (1 - a) / m (softmax(s) - onehot(target))
    with n tokens in the KL and m counted targets in the CE."""

    @staticmethod
    def forward(ctx, student, teacher, targets, alpha, temperature):
        vocabulary = student.shape[-1]
        s_rows, t_rows = student.reshape(-1, vocabulary), teacher.reshape(-1, vocabulary)
        targets = targets.reshape(-1)
        counted = targets != IGNORED
        n, m = s_rows.shape[0], max(int(counted.sum()), 1)
        kd_scale, ce_scale = alpha * temperature / n, (1 - alpha) / m
        rows = max(1, CHUNK_BYTES.get(student.device.type, CHUNK_BYTES["cuda"]) // (4 * vocabulary))
        gradient = torch.empty(s_rows.shape, dtype=torch.float32, device=student.device)
        kl = torch.zeros((), dtype=torch.float64, device=student.device)
        ce = torch.zeros((), dtype=torch.float64, device=student.device)
        for start in range(0, n, rows):
            chunk = slice(start, start + rows)
            chunk_kl, chunk_ce = _losses_of_rows(
                s_rows[chunk],
                t_rows[chunk],
                targets[chunk],
                counted[chunk],
                gradient[chunk],
                temperature,
                kd_scale,
                ce_scale,
            )
            kl += chunk_kl
            ce += chunk_ce
        ctx.save_for_backward(gradient)
        ctx.shape, ctx.dtype = student.shape, student.dtype
        ce, kd = (ce / m).float(), (kl * (temperature**2 / n)).float()
        ctx.mark_non_differentiable(ce, kd)
        return (1 - alpha) * ce + alpha * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        (gradient,) = ctx.saved_tensors
        if grad_loss.device.type != "cpu" or grad_loss.item() != 1:  # x * 1 is x: a pass saved where it is known
            gradient.mul_(grad_loss)  # in place: backward runs once
        return gradient.view(ctx.shape).to(ctx.dtype), None, None, None, None


def next_token_targets(batch: torch.Tensor) -> torch.Tensor:
    """Each position's target is the next token; the last position of a sequence has none."""
    return F.pad(batch[:, 1:], (0, 1), value=IGNORED)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """((1 - alpha) CE + alpha T^2 KL(teacher || student), CE, T^2 KL), float32; CE over the counted
    targets, KL over every token."""
    return _DistillationLoss.apply(student_logits, teacher_logits.detach(), targets, alpha, temperature)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) of the softened distributions, averaged over tokens (float32)."""
    nothing_counted = torch.full(student_logits.shape[:-1], IGNORED, device=student_logits.device)
    return distillation_loss(student_logits, teacher_logits, nothing_counted, 1.0, temperature)[0]


def layer_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """SquareHead's feature term: per decoder layer and sequence ||h_s - h_t||^2 / ||h_t||^2, averaged."""
    terms = [
        (s.float() - t.float()).pow(2).sum(dim=(1, 2)) / t.float().pow(2).sum(dim=(1, 2)).clamp_min(1e-12)
        for s, t in zip(student_hidden, teacher_hidden)
    ]
    return torch.stack(terms).mean()


def cross_entropy(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(the model's own next-token loss, no parts)."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss, {}


class Distillation:
    """The recovery objective of `config.distill` with `teacher` frozen: (loss, its parts, detached)."""

    def __init__(self, teacher: nn.Module, config: TrainConfig):
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = config.distill_alpha, config.distill_temperature
        self.features = config.distill == "squarehead"

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # with alpha = 0 the CE is the model's own loss, so that such training is exactly plain CE training
        labels = batch if self.alpha == 0 else None
        student = model(input_ids=batch, labels=labels, use_cache=False, output_hidden_states=self.features)
        with torch.no_grad():
            teacher = self.teacher(input_ids=batch, use_cache=False, output_hidden_states=self.features)
        if self.alpha == 0:
            loss, ce = student.loss, student.loss.detach()
            kd = kd_loss(student.logits.detach(), teacher.logits, self.temperature)
        else:
            loss, ce, kd = distillation_loss(
                student.logits, teacher.logits, next_token_targets(batch), self.alpha, self.temperature
            )
        parts = {"ce_loss": ce, "kd_loss": kd}
        if self.features:  # hidden_states[0] is the embeddings' output; then one per decoder layer
            layers = layer_loss(student.hidden_states[1:], teacher.hidden_states[1:])
            loss = loss + layers
            parts["layer_loss"] = layers.detach()
        return loss, parts
