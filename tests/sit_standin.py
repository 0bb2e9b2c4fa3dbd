"""A stand-in for SiT's documented training contract (SiT is not on the package registry).

Mirrors willisma/SiT as read at these commits (written from their behaviour, not copied):

* models.py (a87098c): ``LabelEmbedder(num_classes, hidden, dropout_prob)`` keeps an
  ``embedding_table`` of ``num_classes + 1`` rows when ``dropout_prob > 0`` (the last row
  is the null class used for classifier-free guidance) and of ``num_classes`` rows
  otherwise; in train mode with ``dropout_prob > 0`` it replaces each label by
  ``num_classes`` with that probability, in every call. ``SiT.forward(x, t, y)`` embeds
  ``y`` with ``self.y_embedder(y, self.training)``.
* transport/transport.py (6eafdd0): ``Transport.training_losses(model, x1,
  model_kwargs)`` draws ``t ~ U[0, 1)`` (``th.rand``; train_eps = 0 for a velocity
  model on the Linear/GVP paths) and ``x0 ~ N(0, I)``, builds ``x_t = t x1 + (1 - t) x0``
  and ``u_t = x1 - x0`` (Linear), and returns ``{"pred": v, "loss": mean_flat((v -
  u_t)^2)}``: a per-sample loss of shape (B,).
* train.py (947f95b): builds the model with the default ``class_dropout_prob=0.1``,
  wraps it in DDP and calls ``loss_dict = transport.training_losses(model, x,
  dict(y=y)); loss = loss_dict["loss"].mean()``.
* transport/integrators.py (af722da): ``sample_ode(num_steps=M)`` integrates with
  torchdiffeq's ``odeint`` on ``torch.linspace(t0, t1, M)`` (t0 = 0, t1 = 1 for a
  velocity model on Linear/GVP): M - 1 steps.
"""

from __future__ import annotations

import torch
from torch import nn


class LabelEmbedderStandIn(nn.Module):
    """SiT's LabelEmbedder: the null row exists only when dropout_prob > 0."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.looked_up: list[torch.Tensor] = []  # the labels embedded, after any drop

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        self.looked_up.append(labels.detach().clone())
        return self.embedding_table(labels)


class SiTStandIn(nn.Module):
    """model(x, t, y) -> velocity of x's shape; ``labels_seen``: the labels each call
    embedded (after the embedder's own dropout, if any)."""

    def __init__(
        self, channels: int = 2, num_classes: int = 5, class_dropout_prob: float = 0.1
    ) -> None:
        super().__init__()
        hidden = 16
        self.y_embedder = LabelEmbedderStandIn(num_classes, hidden, class_dropout_prob)
        self.t_embed = nn.Linear(1, hidden)
        self.inp = nn.Conv2d(channels, hidden, 1)
        self.out = nn.Conv2d(hidden, channels, 1)

    @property
    def labels_seen(self) -> list[torch.Tensor]:
        return self.y_embedder.looked_up

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.t_embed(t.view(-1, 1).to(x.dtype)) + self.y_embedder(y, self.training)
        return self.out(torch.tanh(self.inp(x) + c[:, :, None, None]))


def sit_linear_training_losses(
    model: nn.Module,
    x1: torch.Tensor,
    model_kwargs: dict,
    *,
    t: torch.Tensor,
    x0: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """SiT's Transport.training_losses for a velocity model on the Linear path, with its
    two draws (t ~ U[0, 1), x0 ~ N(0, I)) given: {"pred", "loss" (B,)}."""
    tb = t.view(-1, *([1] * (x1.dim() - 1)))
    xt = tb * x1 + (1 - tb) * x0
    ut = x1 - x0
    pred = model(xt, t, **model_kwargs)
    return {"pred": pred, "loss": (pred - ut).square().flatten(1).mean(1)}
