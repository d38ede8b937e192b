"""The public verbs: quantize, explain, dequantize. Each is capture -> match -> (rewrite).

``quantize`` changes the model **in place** and returns the same object: parameters are
shared, never copied, so a multi-billion-parameter model can be prepared for QAT within
its own memory. Deep-copy the model first if you need the float original beside it, or
call :func:`dequantize` to get it back.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from stefx.capture import capture
from stefx.errors import CaptureError, NoMatchError, StefxError
from stefx.match import Plan, match
from stefx.recipe import Recipe, Rule, load_recipe
from stefx.rewrite import dequantize as _dequantize

__all__ = ["dequantize", "explain", "quantize"]

RecipeLike = Recipe | Mapping[str, Any] | str | Path
PLAN_ATTR = "_stefx_plan"


def explain(
    model: nn.Module, recipe: RecipeLike, example_inputs: Any = None, *, method: str = "auto"
) -> Plan:
    """The sites each rule would touch, without changing anything. ``print()`` it for a table.
    A PEFT model is explained through its base model (site names are the base model's)."""
    if not isinstance(model, nn.Module):
        raise StefxError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model = target_of(model)
    recipe = load_recipe(recipe)
    captured = capture(model, example_inputs, method=method)
    return match(recipe, captured, model)


def _no_match_message(rule: Rule, plan: Plan) -> str:
    kinds = sorted({c.kind for c in plan.candidates})
    msg = (
        f"recipe {plan.recipe.name!r} {rule.label} matched nothing "
        f"(targets={list(rule.targets)}"
        + (f", pattern={list(rule.pattern)}" if rule.pattern else "")
        + (f", within={rule.within!r}" if rule.within else "")
        + f"); op kinds in this model: {', '.join(kinds)}."
    )
    if "matmul" in rule.targets and "sdpa" in kinds:
        msg += (
            " Attention here runs as fused SDPA: target 'sdpa', or load the model with "
            "attn_implementation='eager' to quantize QK^T and PV separately."
        )
    return (
        msg + " Fix the selectors, or set on_no_match: warn (or ignore) on the rule or the recipe."
    )


def quantize(
    model: nn.Module,
    recipe: RecipeLike,
    example_inputs: Any = None,
    report: bool = True,
    *,
    method: str = "auto",
    as_graph: bool = False,
) -> nn.Module:
    """Insert STE quantizers into ``model`` as ``recipe`` says; return the same model.

    ``recipe``: a preset name (``stefx.recipe.preset_names()``), a YAML/TOML path, a dict
    or a :class:`~stefx.Recipe`. ``example_inputs``: a tuple of positional arguments or a
    dict of keyword arguments (e.g. ``{"input_ids": ids}``); built from the config for
    Hugging Face models when omitted. On any error the model is left exactly as it was.

    ``as_graph=True`` (models ``torch.fx.symbolic_trace`` can trace) returns instead a new
    ``torch.fx.GraphModule`` with the quantizers as nodes before the ops they guard,
    sharing ``model``'s parameters and leaving ``model`` itself unchanged (see
    :mod:`stefx.surgery`).

    A PEFT model (``peft.get_peft_model``) is quantized through its base model: the
    frozen base layers get quantizers (frozen as well), the adapters (``lora_A``,
    ``lora_B``...) stay float, and the PEFT model itself is returned.
    """
    from stefx.rewrite import apply_plan, quantized_modules

    outer, model = model, target_of(model)

    if isinstance(model, nn.Module) and quantized_modules(model):
        raise StefxError(
            f"{type(model).__name__} is already quantized by stefx; call "
            "stefx.dequantize(model) first to apply another recipe"
        )
    plan = explain(model, recipe, example_inputs, method=method)
    if not plan.sites:
        raise NoMatchError(
            f"recipe {plan.recipe.name!r} selected no site in {type(model).__name__}; op kinds "
            f"here: {', '.join(sorted({c.kind for c in plan.candidates})) or 'none'}. "
            "Check the rules' targets with stefx.explain(model, recipe)."
        )
    _warn_constant_binarizers(plan)
    for rule in plan.unmatched:
        if rule.on_no_match == "error":
            raise NoMatchError(_no_match_message(rule, plan))
        if rule.on_no_match == "warn":
            warnings.warn(_no_match_message(rule, plan), stacklevel=2)
    hf = _hf_plugin(model) if not as_graph else None
    if hf is not None:
        hf.check_config(model)  # before anything changes
    if as_graph:
        from stefx.surgery import to_graph_module

        result = to_graph_module(model, plan)
    else:
        apply_plan(model, plan)
        result = model
    object.__setattr__(result, PLAN_ATTR, plan.slim())  # recipe and sites, not the graph
    if hf is not None:  # save_pretrained writes the plan; from_pretrained rebuilds
        hf.attach_config(result)
    if result is model and outer is not model:
        # PEFT froze the base model: its new quantizers start frozen too, so only the
        # adapters train (stefx.train.set_quantizers_trainable(model) to learn the steps)
        from stefx.train import set_quantizers_trainable

        set_quantizers_trainable(model, False)
        result = outer
    if report:
        from stefx.profile import profile  # lazy: report=False never pays for it

        print(plan)
        try:  # the float analysis graph the plan was matched on: no second capture
            print(profile(model, example_inputs, plan=plan, capture=plan.capture))
        except CaptureError as e:  # e.g. a plain model traced without example inputs
            print(f"no efficiency report: {e}")
    return result


def dequantize(model: nn.Module) -> nn.Module:
    """Remove every stefx quantizer and hook from ``model`` (in place) and return it."""
    outer, model = model, target_of(model)
    _dequantize(model)
    if PLAN_ATTR in model.__dict__:
        object.__delattr__(model, PLAN_ATTR)
    hf = _hf_plugin(model)
    if hf is not None:
        hf.detach_config(model)
    return outer


def _warn_constant_binarizers(plan: Plan) -> None:
    from stefx.binary_inputs import binarized_nonnegative_inputs

    found = binarized_nonnegative_inputs(plan)
    if not found:
        return
    where = ", ".join(f"{site!r} (after {producer})" for site, producer in found[:6])
    more = f" and {len(found) - 6} more" if len(found) > 6 else ""
    warnings.warn(
        f"recipe {plan.recipe.name!r} binarizes inputs that are never negative: {where}{more}. "
        "sign() of them is a constant, so those layers cannot learn. Binarize the signal "
        "before the ReLU (e.g. output_activations of the BatchNorm, as XNOR-Net and Bi-Real "
        "Net order it), or keep these inputs float (input_activations: false).",
        stacklevel=3,
    )


def target_of(model: nn.Module) -> nn.Module:
    """The module stefx works on: a PEFT model's base model, else ``model`` itself."""
    if any(c.__name__ in ("PeftModel", "PeftMixedModel") for c in type(model).__mro__):
        return model.get_base_model()
    return model


def plan_of(model: nn.Module) -> Plan | None:
    """The plan ``model`` was quantized with, its sites named where their modules are now
    (``peft.get_peft_model`` after ``quantize`` moves ``q_proj`` to ``q_proj.base_layer``);
    None for a model stefx did not quantize."""
    import dataclasses

    from stefx.runtime import STATE_ATTR

    model = target_of(model)
    plan = model.__dict__.get(PLAN_ATTR)
    if plan is None:
        return None
    moved = {}
    for fqn, module in model.named_modules():
        state = module.__dict__.get(STATE_ATTR)
        if state is not None and state.fqn != fqn:
            moved[state.fqn] = fqn
    if not moved:
        return plan

    def rename(name: str, old: str, new: str) -> str:
        return new + name[len(old) :] if name == old or name.startswith(old + ".") else name

    sites = []
    for s in plan.sites:
        new = moved.get(s.module, s.module)
        sites.append(dataclasses.replace(s, module=new, name=rename(s.name, s.module, new)))
    return dataclasses.replace(plan, sites=sites)


def _hf_plugin(model: nn.Module):
    """:mod:`stefx.hf` for a transformers ``PreTrainedModel``, else None."""
    from stefx.capture.inputs import is_hf_model

    if not is_hf_model(model) or not hasattr(getattr(model, "config", None), "to_dict"):
        return None
    import stefx.hf

    return stefx.hf
