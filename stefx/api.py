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
    """The sites each rule would touch, without changing anything. ``print()`` it for a table."""
    if not isinstance(model, nn.Module):
        raise StefxError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
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
    return msg + " Fix the selectors, or set on_no_match: warn in the recipe."


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
    """
    from stefx.rewrite import apply_plan, quantized_modules

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
    for rule in plan.unmatched:
        if plan.recipe.on_no_match == "error":
            raise NoMatchError(_no_match_message(rule, plan))
        if plan.recipe.on_no_match == "warn":
            warnings.warn(_no_match_message(rule, plan), stacklevel=2)
    if as_graph:
        from stefx.surgery import to_graph_module

        result = to_graph_module(model, plan)
    else:
        apply_plan(model, plan)
        result = model
    object.__setattr__(result, PLAN_ATTR, plan.slim())  # recipe and sites, not the graph
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
    _dequantize(model)
    if PLAN_ATTR in model.__dict__:
        object.__delattr__(model, PLAN_ATTR)
    return model
