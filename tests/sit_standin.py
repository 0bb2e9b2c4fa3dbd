"""A stand-in for SiT's documented training contract (SiT is not on the package registry):
the model (``SiTStandIn``, in reflexflow.demo.toy_models) and Transport.training_losses.

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

from reflexflow.demo.toy_models import LabelEmbedderStandIn, SiTStandIn

__all__ = ["LabelEmbedderStandIn", "SiTStandIn", "sit_linear_training_losses"]


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
