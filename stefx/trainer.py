"""``transformers.Trainer`` helpers for low-bit QAT: :class:`QATTrainer` (the recipe's
learning-rate scales in Trainer's optimizer), :class:`StrengthRamp` (ramp the quantizers
in) and :class:`DistillationTrainer` (learn from the float teacher). Plain-loop
equivalents are in :mod:`stefx.train`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from stefx.errors import StefxError

__all__ = ["DistillationTrainer", "QATTrainer", "StrengthRamp"]


class QATTrainer(Trainer):
    """``Trainer`` whose optimizer applies the recipe's learning-rate scales, as
    :func:`stefx.train.param_groups` does in a plain loop: each quantizer's learned state
    (LSQ steps, SEQ α, thresholds) at its ``lr_scale`` times the learning rate and without
    weight decay, each latent weight at its ``latent_lr_scale`` times. What Trainer itself
    decides is kept: the optimizer ``args.optim`` names, which parameters decay, the
    schedule (it scales every group alike).
    """

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            _scale_param_groups(optimizer, self.model if model is None else model)
        return optimizer


def _scale_param_groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Split a fresh optimizer's groups by the recipe's learning-rate scales (in place)."""
    from stefx.train import param_groups, quantizer_parameters

    factor = {id(p): g["lr"] for g in param_groups(model, 1.0) for p in g["params"]}
    state = {id(p) for _, p in quantizer_parameters(model)}
    if all(f == 1.0 for f in factor.values()) and not state:
        return
    groups = []
    for group in optimizer.param_groups:
        split: dict[tuple[float, bool], list] = {}
        for p in group["params"]:
            split.setdefault((factor.get(id(p), 1.0), id(p) in state), []).append(p)
        for (f, is_state), params in split.items():
            groups.append({**group, "params": params, "lr": group["lr"] * f})
            if is_state:
                groups[-1]["weight_decay"] = 0.0
    optimizer.param_groups[:] = groups


class StrengthRamp(TrainerCallback):
    """Ramps every quantizer's strength λ from 0 to 1 over ``warmup_steps`` optimizer
    steps (:func:`stefx.train.ramp`), and feeds training progress to scheduled estimators
    (EDE). A resumed run picks the ramp up at its step."""

    def __init__(self, warmup_steps: int, progress: bool = True) -> None:
        from stefx.train import ramp

        ramp(0, warmup_steps)  # validates
        self.warmup_steps, self.progress = warmup_steps, progress

    def _apply(self, state, model) -> None:
        from stefx.train import ramp, set_progress, set_strength

        if model is None:
            return
        set_strength(model, ramp(state.global_step, self.warmup_steps))
        if self.progress and state.max_steps:
            set_progress(model, min(1.0, state.global_step / state.max_steps))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:  # the model leaves training fully quantized
            from stefx.train import set_strength

            set_strength(model, 1.0)


class DistillationTrainer(QATTrainer):
    """:class:`QATTrainer` whose loss is ``alpha · KD + (1 - alpha) · CE``: KD the temperature-
    scaled KL of the student's next-token distribution from a frozen float ``teacher``
    (:func:`stefx.train.distillation_loss`, over the tokens the labels keep), plus
    ``hidden_weight`` times the hidden-state MSE; CE the model's own loss from ``labels``.

    >>> # teacher = copy.deepcopy(model); stefx.quantize(model, "w4a8")
    >>> # DistillationTrainer(model=model, teacher=teacher, args=..., train_dataset=...)
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module,
        alpha: float = 1.0,
        temperature: float = 1.0,
        hidden_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise StefxError(f"alpha={alpha!r} is invalid; expected a number in [0, 1]")
        super().__init__(*args, **kwargs)
        # run under no_grad, never trained: its parameters are left as they are (the
        # caller's float model may be quantized or trained next)
        self.teacher = teacher.to(self.args.device).eval()
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from stefx.train import distillation_loss

        hidden = self.hidden_weight > 0
        extra = {"output_hidden_states": True} if hidden else {}
        outputs = model(**inputs, **extra)
        with torch.no_grad():
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            t_out = self.teacher(**teacher_inputs, **extra)
        labels = inputs.get("labels")
        mask = None
        if labels is not None:  # position i predicts token i + 1 (causal LMs)
            mask = torch.zeros_like(labels, dtype=torch.bool)
            mask[..., :-1] = labels[..., 1:] != -100
        kd = distillation_loss(
            outputs.logits,
            t_out.logits,
            self.temperature,
            mask,
            outputs.hidden_states if hidden else None,
            t_out.hidden_states if hidden else None,
            self.hidden_weight,
        )
        ce = outputs.loss if getattr(outputs, "loss", None) is not None else None
        if ce is None and self.alpha < 1.0:
            raise StefxError(
                "DistillationTrainer: alpha < 1 mixes in the model's own loss, but the model "
                "returned none; pass labels in the batch, or set alpha=1.0"
            )
        loss = kd if ce is None else self.alpha * kd + (1.0 - self.alpha) * ce
        return (loss, outputs) if return_outputs else loss
