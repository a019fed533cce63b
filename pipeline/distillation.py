"""Recovery losses: plain cross-entropy, and distillation from a frozen teacher (the dense model).

    logits:      (1 - a) CE + a T^2 KL(softmax(t / T) || softmax(s / T))      (Hinton et al. 2015)
    squarehead:  the logits loss + the mean over decoder layers (and sequences) of ||h_s - h_t||^2 / ||h_t||^2
                 (Kurtic et al. 2023, "Sparse fine-tuning for inference acceleration of LLMs"), each sequence
                 normalized by its own norm, so the loss is the same however a batch is split over processes

The teacher runs without gradients, in the student's autocast (the training dtype). KL and CE are
averaged over tokens; CE is the model's own loss, so a = 0 trains exactly as plain cross-entropy does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig


# Rows of [tokens, vocabulary] float32 worked on at once: on a CPU a chunk that stays in the caches (the KL
# over the whole batch's logits otherwise makes ten passes through memory: measured on opt-tiny, 0.24 s of
# a 0.47 s step, 0.11 s chunked); on a GPU a bound on the temporary memory.
CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 256 << 20}


class _SoftenedKL(torch.autograd.Function):
    """T^2 KL(softmax(t / T) || softmax(s / T)) averaged over tokens, computed chunk by chunk; its gradient
    with respect to the student's logits, T / n (softmax(s / T) - softmax(t / T)), is formed on the way."""

    @staticmethod
    def forward(ctx, student, teacher, temperature):
        vocabulary = student.shape[-1]
        s_rows, t_rows = student.reshape(-1, vocabulary), teacher.reshape(-1, vocabulary)
        n = s_rows.shape[0]
        rows = max(1, CHUNK_BYTES.get(student.device.type, CHUNK_BYTES["cuda"]) // (4 * vocabulary))
        gradient = torch.empty(s_rows.shape, dtype=torch.float32, device=student.device)
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for start in range(0, n, rows):
            s = torch.log_softmax(s_rows[start:start + rows].float() / temperature, dim=-1)
            t = torch.log_softmax(t_rows[start:start + rows].float() / temperature, dim=-1)
            p_t = t.exp()
            total += (p_t * (t - s)).sum(dtype=torch.float64)
            gradient[start:start + rows] = s.exp_().sub_(p_t)
        ctx.save_for_backward(gradient)
        ctx.scale, ctx.shape, ctx.dtype = temperature / n, student.shape, student.dtype
        return (total * (temperature ** 2 / n)).float()

    @staticmethod
    def backward(ctx, grad_output):
        (gradient,) = ctx.saved_tensors
        return (gradient * (grad_output * ctx.scale)).view(ctx.shape).to(ctx.dtype), None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) of the softened distributions, averaged over tokens (float32)."""
    return _SoftenedKL.apply(student_logits, teacher_logits.detach(), temperature)


def layer_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """SquareHead's feature term: per decoder layer and sequence ||h_s - h_t||^2 / ||h_t||^2, averaged."""
    terms = [(s.float() - t.float()).pow(2).sum(dim=(1, 2)) / t.float().pow(2).sum(dim=(1, 2)).clamp_min(1e-12)
             for s, t in zip(student_hidden, teacher_hidden)]
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
        student = model(input_ids=batch, labels=batch, use_cache=False, output_hidden_states=self.features)
        with torch.no_grad():
            teacher = self.teacher(input_ids=batch, use_cache=False, output_hidden_states=self.features)
        kd = kd_loss(student.logits, teacher.logits, self.temperature)
        loss = (1 - self.alpha) * student.loss + self.alpha * kd
        parts = {"ce_loss": student.loss.detach(), "kd_loss": kd.detach()}
        if self.features:  # hidden_states[0] is the embeddings' output; then one per decoder layer
            layers = layer_loss(student.hidden_states[1:], teacher.hidden_states[1:])
            loss = loss + layers
            parts["layer_loss"] = layers.detach()
        return loss, parts
