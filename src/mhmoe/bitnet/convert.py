"""The BitNet converter: swap a model's nn.Linear, Experts (and optionally router) modules for
their BitNet b1.58 versions in place (``to_bitnet``), replay stored options (``apply_bitnet``).
See ``mhmoe.bitnet.layers`` for the recipe.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from mhmoe.bitnet.layers import BitExperts, BitLinear, BitRouter
from mhmoe.config import DEFAULT_EXCLUDE, BitNetConfig, ModelConfig
from mhmoe.layers.experts import Experts
from mhmoe.layers.routing import TopKRouter

logger = logging.getLogger(__name__)


Pattern = str | re.Pattern


def _compile_patterns(name: str, patterns: Pattern | Iterable[Pattern] | None) -> list[tuple[str, Any]]:
    """Patterns: glob strings (fnmatch, case-sensitive, whole name), ``re:<regex>`` strings or
    compiled ``re.Pattern`` objects (both full-match the module name; a compiled pattern is
    recorded in ``BitNetConfig`` as its ``re:`` string, without its flags)."""
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        if isinstance(pattern, re.Pattern):
            compiled.append((f"re:{pattern.pattern}", pattern))  # recorded as a "re:" string
        elif isinstance(pattern, str) and pattern.startswith("re:"):
            try:
                compiled.append((pattern, re.compile(pattern[3:])))
            except re.error as err:
                raise ValueError(f"{name} pattern {pattern!r}: invalid regular expression ({err})") from None
        elif isinstance(pattern, str) and pattern:
            compiled.append((pattern, pattern))
        else:
            raise ValueError(
                f"{name} pattern {pattern!r}: must be a non-empty glob string, 're:<regex>' or re.Pattern"
            )
    return compiled


def _matches(module_name: str, pattern: Any) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(module_name) is not None
    return fnmatch.fnmatchcase(module_name, pattern)


_QUANTIZED_TYPES: tuple[type, ...] = (BitLinear, BitExperts, BitRouter)


def _eligible(module: nn.Module, quantize_router: bool) -> bool:
    """Exactly nn.Linear (subclasses such as MultiheadAttention's out_proj are read by weight
    elsewhere and are left alone), any Experts, the router when asked; never twice."""
    if isinstance(module, _QUANTIZED_TYPES):
        return False
    if type(module) is nn.Linear or isinstance(module, Experts):
        return True
    return quantize_router and isinstance(module, TopKRouter)


def _convert(module: nn.Module, norm: bool) -> nn.Module:
    if isinstance(module, Experts):
        return BitExperts.from_experts(module, norm=norm)
    if isinstance(module, TopKRouter):
        return BitRouter.from_router(module)
    if module.bias is not None:
        logger.warning("BitLinear from a biased nn.Linear: the bias stays in full precision")
    return BitLinear.from_linear(module, norm=norm)


def to_bitnet(
    model: nn.Module,
    include: Pattern | Sequence[Pattern] | None = None,
    exclude: Pattern | Sequence[Pattern] | None = DEFAULT_EXCLUDE,
    quantize_router: bool = False,
    norm: bool = True,
) -> nn.Module:
    """Swap modules for their BitNet b1.58 versions, in place; returns the model.

    Candidates: every ``nn.Linear`` (exact type) -> ``BitLinear``, every ``Experts`` ->
    ``BitExperts`` and, with ``quantize_router``, every ``TopKRouter`` -> ``BitRouter``; the new
    modules share the old Parameters (so weights, devices, dtypes and state_dict keys are kept;
    the inner-norm gains are the only new keys, see the module docstring).

    A candidate named ``name`` (as in ``model.named_modules()``) is converted when ``include`` is
    None or one include pattern matches it, and no ``exclude`` pattern matches it. Patterns are
    globs (``"blocks.*.attention.*"``), ``"re:<regex>"`` strings or compiled regexes, matched
    against the whole name. By default the LM head (``lm_head``) is excluded; embeddings are
    never candidates. Each explicit include pattern must match at least one candidate
    (ValueError otherwise: a typo would silently train a full-precision model).

    A model with a ``ModelConfig`` (``TransformerLM``) records the options in ``model.config.bitnet``.
    """
    include_p = _compile_patterns("include", include) if include is not None else None
    exclude_p = _compile_patterns("exclude", exclude)
    candidates = [(name, m) for name, m in model.named_modules() if _eligible(m, quantize_router)]
    if include_p is not None:
        for raw, pattern in include_p:
            if not any(_matches(name, pattern) for name, _ in candidates):
                raise ValueError(
                    f"include pattern {raw!r} matches no convertible module "
                    f"(nn.Linear, Experts{', TopKRouter' if quantize_router else ''}); "
                    f"candidates: {[name for name, _ in candidates][:20]}"
                )
    selected = [
        (name, m) for name, m in candidates
        if (include_p is None or any(_matches(name, p) for _, p in include_p))
        and not any(_matches(name, p) for _, p in exclude_p)
    ]
    # Modules whose weight the model reads directly (TransformerLM's LM head: logits =
    # F.linear(x, lm_head.weight)) would run unquantised as BitLinear.
    read_by_weight = {name for name in getattr(model, "weights_read_directly", ())}
    for name, _ in selected:
        if name in read_by_weight:
            raise ValueError(
                f"{name} selected for quantisation: {type(model).__name__} computes its logits "
                f"from {name}.weight directly, so a BitLinear {name} would run unquantised; keep "
                "it out of include (it is in the default exclude)"
            )
    for name, module in selected:
        new = _convert(module, norm)
        new.train(module.training)
        if name == "":
            model = new
            break
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    logger.info("to_bitnet: %d modules quantised (%d candidates)", len(selected), len(candidates))
    config = BitNetConfig(
        include=None if include is None else tuple(raw for raw, _ in include_p),
        exclude=tuple(raw for raw, _ in exclude_p),
        quantize_router=quantize_router,
        norm=norm,
    )
    if isinstance(getattr(model, "config", None), ModelConfig):  # the model's config tree says so
        model.config = model.config.replace(bitnet=config)
    return model


def apply_bitnet(model: nn.Module, config: BitNetConfig | dict[str, Any] | bool | None) -> nn.Module:
    """``to_bitnet`` with stored options: the one call for trainers and run loaders.

    ``config``: None/False leaves the model unchanged; True uses the defaults; a BitNetConfig
    or its ``to_dict()`` (as stored in a run's config.json under "bitnet") replays those options.
    """
    if config is None or config is False:
        return model
    if config is True:
        config = BitNetConfig()
    elif isinstance(config, dict):
        config = BitNetConfig.from_dict(config)
    elif not isinstance(config, BitNetConfig):
        raise ValueError(f"bitnet={config!r}: must be None, a bool, a BitNetConfig or its dict")
    return to_bitnet(
        model, include=config.include, exclude=config.exclude,
        quantize_router=config.quantize_router, norm=config.norm,
    )


def bitnet_modules(model: nn.Module) -> list[str]:
    """Names of the BitNet-quantised modules of ``model`` (in ``named_modules`` order)."""
    return [name for name, m in model.named_modules() if isinstance(m, _QUANTIZED_TYPES)]
