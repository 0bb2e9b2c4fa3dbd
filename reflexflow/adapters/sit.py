"""SiT's ``Transport.training_losses`` contract: :class:`SiTTransportAdapter`,
:func:`drop_labels`, :func:`sit_path`, :func:`sit_label_embedder`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..loss import ReflexFlowLoss, ReflexFlowOutput
from ..paths import VPPath


def drop_labels(
    y: Tensor, prob: float, null_label: int, generator: torch.Generator | None = None
) -> Tensor:
    """Classifier-free-guidance label dropout: y_i -> null_label with probability ``prob``."""
    if isinstance(prob, bool) or not isinstance(prob, (int, float)):
        raise TypeError(f"prob must be a number, got {prob!r}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if not isinstance(y, Tensor) or y.dim() != 1:
        raise TypeError("y must be a (B,) tensor of class labels")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    if isinstance(null_label, bool) or not isinstance(null_label, int):
        raise TypeError(f"null_label must be an int, got {null_label!r}")
    if prob == 0.0:
        return y
    drop = torch.rand(y.shape, device=y.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(y, null_label), y)


_SIT_PATHS = {"linear": "linear", "gvp": "gvp", "vp": "vp"}


def sit_path(path_type: Any) -> str:
    """reflexflow path name of a SiT path type ("Linear", "GVP", "VP" or SiT's PathType)."""
    name = getattr(path_type, "name", path_type)
    if not isinstance(name, str) or name.lower() not in _SIT_PATHS:
        raise ValueError(f"path_type must be one of 'Linear', 'GVP', 'VP', got {path_type!r}")
    return _SIT_PATHS[name.lower()]


_SIT_PLANS = {"ICPlan": "linear", "GVPCPlan": "gvp"}


def _transport_path(transport_or_path: Any) -> Any:
    """The reflexflow path of a SiT Transport (from its path_sampler plan) or path type.

    SiT's Transport keeps no path_type, only ``path_sampler``: an ICPlan (linear),
    GVPCPlan (gvp) or VPCPlan(sigma_min, sigma_max) (vp with those betas).
    """
    if hasattr(transport_or_path, "path_type"):
        return sit_path(transport_or_path.path_type)
    plan = getattr(transport_or_path, "path_sampler", None)
    if plan is None:
        return sit_path(transport_or_path)
    name = type(plan).__name__
    if name == "VPCPlan":
        return VPPath(float(plan.sigma_min), float(plan.sigma_max))
    if name not in _SIT_PLANS:
        raise ValueError(
            f"transport.path_sampler must be a SiT ICPlan, GVPCPlan or VPCPlan, got {name}"
        )
    return _SIT_PLANS[name]


def _y_embedder(model: Any) -> Any | None:
    """``model.y_embedder`` through DDP's .module and compile's ._orig_mod, or None."""
    for _ in range(8):  # wrappers nest a few levels at most
        emb = getattr(model, "y_embedder", None)
        if emb is not None:
            return emb
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return None
        model = inner
    return None


def _follows_sit_contract(emb: Any) -> bool:
    return (
        isinstance(getattr(emb, "embedding_table", None), torch.nn.Embedding)
        and hasattr(emb, "num_classes")
        and hasattr(emb, "dropout_prob")
    )


def sit_label_embedder(model: Any) -> Any | None:
    """SiT's ``LabelEmbedder`` of ``model`` (through DDP's .module and compile's ._orig_mod).

    The contract (SiT's models.py): ``model.y_embedder`` with ``embedding_table`` (an
    nn.Embedding of num_classes + 1 rows when its dropout_prob > 0, num_classes rows
    otherwise: the null-class row exists only then), ``num_classes`` and
    ``dropout_prob`` (the model drops labels itself, in every train-mode call, with this
    probability). None when the model has no ``y_embedder``. A ``y_embedder`` that drops
    labels (``dropout_prob`` > 0) but breaks the contract (e.g. its table is not named
    ``embedding_table``) is refused with a ValueError: the adapter could neither switch
    its dropout off nor check its null row, and labels would be dropped independently
    in every model call of a step.
    """
    emb = _y_embedder(model)
    if emb is None:
        return None
    if _follows_sit_contract(emb):
        return emb
    prob = getattr(emb, "dropout_prob", 0)
    if isinstance(prob, (int, float)) and prob > 0:
        raise ValueError(
            f"the model's y_embedder ({type(emb).__name__}) drops labels itself "
            f"(dropout_prob={prob}) but does not follow SiT's LabelEmbedder contract "
            "(an nn.Embedding named embedding_table, num_classes, dropout_prob), so the "
            "adapter cannot switch that dropout off during its calls: every model call of "
            "a step would drop labels differently. Name the table embedding_table and "
            "give the embedder num_classes, or set y_embedder.dropout_prob = 0 and let "
            "the adapter drop labels (class_dropout_prob=..., num_classes=...)"
        )
    return None


@contextmanager
def _model_label_dropout_off(embedder: Any | None) -> Iterator[None]:
    """Set a SiT LabelEmbedder's own dropout_prob to 0 for the block, then restore it."""
    if embedder is None or not embedder.dropout_prob:
        yield
        return
    before = embedder.dropout_prob
    embedder.dropout_prob = 0.0
    try:
        yield
    finally:
        embedder.dropout_prob = before


class SiTTransportAdapter:
    """Drop-in for SiT's ``Transport.training_losses(model, x1, model_kwargs)``.

    SiT's path is reflexflow's canonical one (x_t = alpha_t x1 + sigma_t x0, data x1 at
    t = 1, noise x0), and SiT's models are called as ``model(x, t, y=...)``. The change in
    SiT's train.py is one line, ``transport = SiTTransportAdapter(args.path_type)``;
    ``loss_dict = transport.training_losses(model, x, model_kwargs)`` and
    ``loss = loss_dict["loss"].mean()`` stay: "loss" is per sample, shape (B,), as SiT's,
    and its mean is the library's loss (same value, same gradient).

    ``transport_or_path`` is a SiT Transport (its path is read from its path_sampler,
    its model_type must be velocity) or a path type name. Other ``knobs`` go to
    :class:`ReflexFlowLoss` (e.g. ``num_sampling_steps``; see below).

    Label dropout (classifier-free guidance). SiT's model drops labels itself, in every
    train-mode call, when its ``class_dropout_prob`` > 0 (its label table then has a
    null-class row at index num_classes, and only then). The adapter drops labels once
    per step instead, so the rollout and both gradient calls see the same (kept or
    dropped) label, and switches the model's own dropout off during its calls:

    * ``class_dropout_prob=None`` (default): the model's own probability (SiT's default
      0.1) when it exposes SiT's ``y_embedder``, else no dropout;
    * a number: that probability (0: no label is dropped, the model's own dropout is
      off too). With a SiT model whose label table has no null row
      (built with class_dropout_prob=0) a probability > 0 is refused with a ValueError
      saying what to do; a model that hides its table fails on the first call that
      drops a label, with the same advice;
    * ``num_classes`` (the null label's id) defaults to the model's ``num_classes``.

    Sampling steps. ``num_sampling_steps`` (N) sets the rollout step h = 1 / N: pick the
    inference you train for. SiT's ``Sampler.sample_ode(sampling_method="euler",
    num_steps=M)`` integrates on ``torch.linspace(0, 1, M)``, i.e. M - 1 Euler steps of
    1 / (M - 1): use ``num_sampling_steps = M - 1`` (e.g. num_steps=51 is N = 50). For
    the VP path SiT stops at 1 - sample_eps: h = (1 - sample_eps) / (M - 1). SiT's
    default, dopri5, is adaptive (num_steps there only sets the saved points): choose N
    as the number of fixed steps you will sample with.
    """

    def __init__(
        self,
        transport_or_path: Any = "Linear",
        *,
        num_classes: int | None = None,
        class_dropout_prob: float | None = None,
        label_key: str = "y",
        **knobs: Any,
    ) -> None:
        model_type = getattr(transport_or_path, "model_type", None)
        if model_type is not None and getattr(model_type, "name", model_type) != "VELOCITY":
            raise ValueError(
                f"ReflexFlow trains a velocity model; the transport's model_type is {model_type}"
            )
        path = _transport_path(transport_or_path)
        if class_dropout_prob is not None:
            if isinstance(class_dropout_prob, bool) or not isinstance(
                class_dropout_prob, (int, float)
            ):
                raise TypeError(
                    f"class_dropout_prob must be a number or None, got {class_dropout_prob!r}"
                )
            if not 0.0 <= class_dropout_prob <= 1.0:
                raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
            class_dropout_prob = float(class_dropout_prob)
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if not isinstance(label_key, str):
            raise TypeError(f"label_key must be a str (a model_kwargs key), got {label_key!r}")
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.label_key = label_key
        self.loss_fn = ReflexFlowLoss(path=path, **knobs)
        if self.loss_fn.config.memory == "lean":
            raise ValueError(
                "memory='lean' does not fit SiT's contract: training_losses must return a "
                "per-sample loss that train.py backpropagates with .mean().backward(), and "
                "the lean step's ADR forward only runs inside out.backward() (outside the "
                "adapter's label handling); use ReflexFlowLoss(memory='lean') directly"
            )

    def label_dropout(self, model: Any) -> tuple[float, int | None, Any | None]:
        """(probability, null label, SiT LabelEmbedder or None) this adapter uses with model.

        Raises ValueError when labels would be dropped to a null class the model's label
        table does not have, or when num_classes disagrees with the model's.
        """
        embedder = sit_label_embedder(model)
        num_classes = self.num_classes
        if embedder is not None:
            if num_classes is not None and num_classes != embedder.num_classes:
                raise ValueError(
                    f"num_classes={num_classes} but the model's label embedder has "
                    f"num_classes={embedder.num_classes}"
                )
            num_classes = int(embedder.num_classes)
        prob = self.class_dropout_prob
        if prob is None:
            prob = float(embedder.dropout_prob) if embedder is not None else 0.0
        if prob > 0 and num_classes is None:
            raise ValueError(
                "class_dropout_prob > 0 needs num_classes (the null label's id): pass it, "
                "or use a model that exposes SiT's y_embedder"
            )
        if prob > 0 and embedder is not None:
            rows = embedder.embedding_table.num_embeddings
            if rows <= num_classes:
                raise ValueError(_no_null_row_message(rows, num_classes, prob))
        return prob, num_classes, embedder

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x1: Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
        *,
        generator: torch.Generator | None = None,
        **loss_kwargs: Any,
    ) -> dict[str, Any]:
        """SiT's signature: {"loss" (B,), "fc_loss", "adr_loss", "bias_norm", "t", "output"}.

        "loss" is the per-sample loss (``ReflexFlowOutput.per_sample_loss``), so
        ``loss_dict["loss"].mean()`` is L = L_FC + lambda_adr L_ADR; "fc_loss" and
        "adr_loss" are the two (detached) terms, "t" the rollout start times, "output"
        the full :class:`ReflexFlowOutput`. ``loss_kwargs`` (noise, t, k) go to the loss.
        """
        if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
            raise TypeError(
                f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}"
            )
        kwargs = dict(model_kwargs or {})
        prob, null_label, embedder = self.label_dropout(model)
        if prob > 0:
            if self.label_key not in kwargs:
                raise ValueError(f"model_kwargs has no {self.label_key!r} labels to drop")
            kwargs[self.label_key] = drop_labels(
                kwargs[self.label_key], prob, null_label, generator
            )
        with _model_label_dropout_off(embedder):  # the adapter decides, 0 included
            try:
                out: ReflexFlowOutput = self.loss_fn(
                    model, x1, model_kwargs=kwargs, generator=generator, **loss_kwargs
                )
            except IndexError as err:
                if prob > 0 and embedder is None:
                    raise ValueError(
                        f"the model failed with IndexError ({err}) on labels dropped to the "
                        f"null class {null_label}: its label table probably has no null row. "
                        + _NULL_ROW_ADVICE
                    ) from err
                raise
        return {
            "loss": out.per_sample_loss,
            "fc_loss": out.fc_loss,
            "adr_loss": out.adr_loss,
            "bias_norm": out.bias_norm,
            "t": out.t0,
            "output": out,
        }


_NULL_ROW_ADVICE = (
    "Either build the SiT model with class_dropout_prob > 0 (SiT's default 0.1, as its "
    "train.py does: the table then has the null row, and the adapter switches the model's "
    "own dropout off during its calls), or give the adapter class_dropout_prob=0 (no "
    "label dropout, no classifier-free guidance)."
)


def _no_null_row_message(rows: int, num_classes: int, prob: float) -> str:
    return (
        f"the adapter drops labels to the null class {num_classes} with probability {prob}, "
        f"but the model's label table (y_embedder.embedding_table) has {rows} rows: no null "
        f"row (SiT adds it only when the model's class_dropout_prob > 0). " + _NULL_ROW_ADVICE
    )
