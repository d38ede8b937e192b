"""Training utilities for low-bit QAT: the quantizers' learned parameters (freeze,
unfreeze), ramping quantization in, and distillation from the float teacher.

- :func:`quantizer_parameters`, :func:`set_quantizers_trainable`;
- :func:`set_strength` (λ: ``x + λ·(q(x) - x)`` on every quantizer) and
  :func:`ramp`, the linear schedule 0 -> 1 over the first steps; :func:`set_progress`
  drives estimators with a schedule of their own (EDE);
- :func:`distillation_loss`: the temperature-scaled KL of the student's token
  distribution from the teacher's (Hinton et al., arXiv:1503.02531), the loss LLM-QAT
  (Liu et al., arXiv:2305.17888) and BitDistill train low-bit students with, optionally
  plus the mean squared error of hidden states.

``stefx.trainer`` wraps the last three for ``transformers.Trainer``:
:class:`~stefx.trainer.StrengthRamp` (a callback) and
:class:`~stefx.trainer.DistillationTrainer`.

>>> import torch, stefx
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> q = stefx.quantize(net, "w4a8", (torch.randn(2, 8),), report=False)
>>> [name for name, _ in stefx.train.quantizer_parameters(q)]
['0.weight_quantizer.scale']
>>> stefx.train.set_quantizers_trainable(q, False)
>>> q[0].weight_quantizer.scale.requires_grad
False
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stefx.errors import StefxError

__all__ = [
    "distillation_loss",
    "param_groups",
    "quantizer_parameters",
    "quantizers",
    "ramp",
    "set_progress",
    "set_quantizers_trainable",
    "set_strength",
]


def quantizers(model: nn.Module) -> list:
    """Every stefx quantizer in ``model``."""
    from stefx.ste.base import Quantizer

    return [m for m in model.modules() if isinstance(m, Quantizer)]


def quantizer_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every quantizer's learned state (LSQ steps and offsets,
    PACT clips, SEQ scales...), as ``model.named_parameters()`` names them; e.g. to give
    them their own learning rate or weight decay in an optimizer."""
    from stefx.ste.base import Quantizer

    for mod_name, module in model.named_modules():
        if isinstance(module, Quantizer):
            for p_name, p in module.named_parameters(recurse=False):
                yield (f"{mod_name}.{p_name}" if mod_name else p_name), p


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    quantizer_lr: float | None = None,
    quantizer_weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer parameter groups: the model's trainable parameters with ``lr`` and
    ``weight_decay``, the quantizers' learned state with ``quantizer_lr`` (default ``lr``)
    and no weight decay by default (decay pulls a learned step toward zero, i.e. toward
    fewer levels). ``torch.optim.AdamW(stefx.train.param_groups(model, 1e-4))``.

    A recipe's quantizer spec can scale these: ``lr_scale`` multiplies the learning rate
    of that quantizer's own state (an LSQ step, a SEQ α, a learned threshold), and
    ``latent_lr_scale`` on a weight quantizer multiplies that of the float weight it
    guards (binary latent weights must cross zero to flip a sign: BNN scales their rate
    up). The first group is always the model's other parameters.

    >>> import torch, stefx
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> q = stefx.quantize(net, "w4a8", (torch.randn(2, 8),), report=False)
    >>> [len(g["params"]) for g in param_groups(q, 1e-3, quantizer_lr=1e-4)]
    [2, 1]
    """
    from stefx.rewrite import STATE_ATTR, quantized_modules

    base_q = lr if quantizer_lr is None else quantizer_lr
    # (quantizer state?, lr, weight decay) -> parameters; the quantizers' state keeps a
    # group of its own even at the model's rate, for a schedule to address it
    groups: dict[tuple[bool, float, float], list[nn.Parameter]] = {(False, lr, weight_decay): []}
    placed: set[int] = set()

    def put(p: nn.Parameter, state: bool, group_lr: float, decay: float) -> None:
        if p.requires_grad and id(p) not in placed:
            placed.add(id(p))
            groups.setdefault((state, group_lr, decay), []).append(p)

    for quantizer in quantizers(model):
        for p in quantizer.parameters(recurse=False):
            put(p, True, base_q * (quantizer.spec.lr_scale or 1.0), quantizer_weight_decay)
    for module in quantized_modules(model).values():  # latent weights with their own rate
        for weight, qname in module.__dict__[STATE_ATTR].weight_quantizers():
            scale = module._modules[qname].spec.latent_lr_scale
            if scale is not None:
                put(module.get_parameter(weight), False, lr * scale, weight_decay)
    for p in model.parameters():
        put(p, False, lr, weight_decay)
    first = groups.pop((False, lr, weight_decay))
    return [{"params": first, "lr": lr, "weight_decay": weight_decay}] + [
        {"params": params, "lr": group_lr, "weight_decay": decay}
        for (_, group_lr, decay), params in groups.items()
    ]


def set_quantizers_trainable(model: nn.Module, trainable: bool = True) -> None:
    """Freeze (``False``) or unfreeze the quantizers' learned parameters, leaving every
    other parameter as it is (PEFT freezes them with the base model; turn them back on
    to learn the steps beside the adapters)."""
    for _, p in quantizer_parameters(model):
        p.requires_grad_(trainable)


def set_strength(model: nn.Module, strength: float) -> None:
    """λ of every quantizer: 0 runs the float model (each quantized module takes its float
    path), 1 the quantized one, in between ``x + λ·(q(x) - x)``."""
    for q in quantizers(model):
        q.strength = strength


def ramp(step: int, warmup_steps: int) -> float:
    """Linear ramp of λ: 0 at step 0, 1 from ``warmup_steps`` on.

    >>> [ramp(s, 4) for s in (0, 1, 4, 9)]
    [0.0, 0.25, 1.0, 1.0]
    """
    if warmup_steps < 0:
        raise StefxError(f"warmup_steps={warmup_steps!r} is invalid; expected an int >= 0")
    return 1.0 if warmup_steps == 0 else min(1.0, max(0.0, step / warmup_steps))


def set_progress(model: nn.Module, progress: float) -> None:
    """Training progress in [0, 1] for quantizers whose estimator follows a schedule
    (the binary EDE estimator); others have no ``progress`` and are left alone."""
    for q in quantizers(model):
        if hasattr(type(q), "progress"):
            q.progress = progress


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    student_hidden: Sequence[torch.Tensor] | None = None,
    teacher_hidden: Sequence[torch.Tensor] | None = None,
    hidden_weight: float = 0.0,
) -> torch.Tensor:
    """KL(teacher ‖ student) of the softened token distributions, times T², averaged
    over the tokens ``mask`` keeps (all by default); plus ``hidden_weight`` times the mean
    squared error of matching hidden states when both lists are given.

    >>> t = torch.randn(2, 5, 11)
    >>> float(distillation_loss(t, t))  # a student equal to its teacher
    0.0
    """
    if temperature <= 0:
        raise StefxError(f"temperature={temperature!r} is invalid; expected a number > 0")
    if student_logits.shape != teacher_logits.shape:
        raise StefxError(
            f"distillation_loss: student logits {tuple(student_logits.shape)} and teacher "
            f"logits {tuple(teacher_logits.shape)} differ; the teacher must share the vocabulary"
        )
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    per_token = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        keep = mask.reshape(-1).to(per_token.dtype)
        loss = (per_token * keep).sum() / keep.sum().clamp_min(1.0)
    else:
        loss = per_token.mean()
    loss = loss * temperature**2
    if hidden_weight and student_hidden is not None and teacher_hidden is not None:
        pairs = list(zip(student_hidden, teacher_hidden, strict=True))
        mse = sum(F.mse_loss(a.float(), b.float()) for a, b in pairs) / len(pairs)
        loss = loss + hidden_weight * mse
    return loss
