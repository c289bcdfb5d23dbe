"""RELEX as a mergekit (>= 0.1.5) merge method, on the same math and kernels as the streaming engine.

    from relex_merge.interop.mergekit_method import register
    register()            # explicit and idempotent; importing this module registers nothing

mergekit then accepts ``merge_method: relex`` with a per-model ``step`` and the shared
``target_step``, ``rank``, ``fit`` (any fixed family; ``auto`` needs the whole model, which a
per-tensor mergekit task never sees), the families' shape keys (``degree``, ``p``, ``tau``: generated
from their declarations), ``window``, ``scale``, ``mode``, ``refit_every``, ``refit_window`` and
``base_step``. A family whose shape the backtest would
choose (power without ``p``, log or saturating without ``tau``) needs the shape here.
mergekit hands a method all T+1 copies of a tensor at once; the relex-merge engine instead
streams spans of rows within --max-memory.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Literal, Optional

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import BasePolicy, InputContract, MergeMethod, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from relex_merge.core import fits
from relex_merge.core.kernels import Scratch, block_columns, fold_grams, gram_chunk, span_gram, span_outputs
from relex_merge.core.relex import relex_weights, spec_from_parameters

__all__ = ["METHOD_NAME", "RELEX_METHOD", "register", "relex_group"]

METHOD_NAME = "relex"  # merge_method: relex in mergekit configs


def _relex_group(
    group: TensorGroup,
    step: PerNonBase[int],
    target_step: int,
    rank: int = 1,
    fit: str = "linear",
    window: int | None = None,
    scale: float = 1.0,
    mode: Literal["extrapolate", "reconstruct", "fit_reconstruct"] = "extrapolate",
    refit_every: int | None = None,
    refit_window: int | None = None,
    base_step: int = 0,
    **shapes: float | None,
) -> torch.Tensor:
    """The RELEX prediction of one tensor at ``target_step`` from its base and window copies
    (mergekit's per-tensor call; the parameters are the config's). ValueError for a fit the
    backtest would have to choose, or duplicate steps."""
    spec = spec_from_parameters(
        rank=rank,
        fit=fit,
        window=window,
        scale=scale,
        mode=mode,
        refit_every=refit_every,
        refit_window=refit_window,
        base_step=base_step,
        **shapes,
    )
    if spec.fit.resolved is None:
        raise ValueError(
            f"relex: fit {spec.fit.describe()} needs the whole model's backtest; give the shape (p or tau) or a "
            "fixed fit "
            "(relex-merge analyze names the best one)"
        )
    base = group.base.tensor
    # order by the step value: mergekit's input order is not the training order
    entries = sorted(group.non_base, key=lambda entry: step[entry.id])
    steps = [step[entry.id] for entry in entries]
    if len(set(steps)) != len(steps):
        raise ValueError(f"relex: duplicate step values {steps}")
    # the streaming engine's kernels, over the whole tensor as one span
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    inputs = [base.reshape(-1)] + [entry.tensor.reshape(-1) for entry in entries]
    scratch = Scratch.allocate(len(entries), block_columns(len(entries), compute), compute, base.device)
    gram = fold_grams(span_gram(inputs, scratch, gram_chunk(base.shape)).cpu())
    weights = relex_weights(gram, steps, [target_step], spec)
    out = torch.empty(1, base.numel(), dtype=base.dtype, device=base.device)
    span_outputs(inputs, weights, scratch, out)
    return out.reshape(base.shape)


def _with_shape_parameters(func):
    """``func`` with one keyword parameter per shape key the fit families declare (degree, p,
    tau, ...) in place of ``**shapes``: mergekit builds a method's parameters from its typed
    signature, so a new family's shape parameter reaches mergekit configs with no edit here."""
    signature = inspect.signature(func)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    annotations = dict(typing.get_type_hints(func, include_extras=True))
    annotations.pop("shapes", None)
    for key in sorted(fits.shape_keys()):
        integer, _ = fits.shape_parameter(key)
        annotations[key] = Optional[int] if integer else Optional[float]
        fixed.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotations[key]))

    @functools.wraps(func)
    def relex_group(*args, **kwargs):
        return func(*args, **kwargs)

    relex_group.__signature__ = signature.replace(parameters=fixed)
    relex_group.__annotations__ = annotations
    del relex_group.__wrapped__  # mergekit must see the generated signature, not the original
    return relex_group


relex_group = _with_shape_parameters(_relex_group)

RELEX_METHOD: MergeMethod = merge_method(
    relex_group,
    name=METHOD_NAME,
    pretty_name="RELEX extrapolation",
    reference_url="https://arxiv.org/abs/2605.21468",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2),
)


def register() -> MergeMethod:
    """Make ``merge_method: relex`` available to mergekit; safe to call any number of times."""
    current = {m.spec.name: m for m in registry.registered_methods()}.get(METHOD_NAME)
    if current is None:
        registry.register(RELEX_METHOD)
    elif current is not RELEX_METHOD:
        raise RuntimeError(f"another mergekit method is already registered as {METHOD_NAME!r}")
    return RELEX_METHOD
