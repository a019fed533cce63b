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


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) of the softened distributions, averaged over tokens (float32)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature ** 2 * (teacher.exp() * (teacher - student)).sum(dim=-1).mean()


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
