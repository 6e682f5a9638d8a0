"""Analytic FLOP count of a JAX function from its jaxpr (convolutions and matmuls).

XLA's cost analysis misses cuDNN convolutions on GPU, so throughput figures use this
count instead: 2 FLOPs per multiply-add of every ``conv_general_dilated`` and
``dot_general`` (attention's q k^T and a v included), recursing into sub-jaxprs (jit,
scan bodies times their length, remat, custom_vjp). Element-wise work is not counted.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core


def _conv_flops(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    groups = eqn.params["feature_group_count"] * eqn.params.get("batch_group_count", 1)
    in_ch = rhs.shape[dn.rhs_spec[1]]  # kernel input features (already per group)
    kernel_spatial = math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
    del lhs, groups
    return 2 * math.prod(out.shape) * in_ch * kernel_spatial


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs.shape[d] for d in lc)
    batch = math.prod(lhs.shape[d] for d in lb)
    lhs_free = math.prod(s for d, s in enumerate(lhs.shape) if d not in lc and d not in lb)
    rhs_free = math.prod(s for d, s in enumerate(rhs.shape) if d not in rc and d not in rb)
    return 2 * batch * lhs_free * rhs_free * contract


def sub_jaxprs(eqn):
    """(parameter name, jaxpr) of every jaxpr an equation holds: jit, scan, cond, custom rules."""
    for name, value in eqn.params.items():
        if isinstance(value, core.ClosedJaxpr):
            yield name, value.jaxpr
        elif isinstance(value, core.Jaxpr):
            yield name, value
        elif isinstance(value, tuple | list):
            for v in value:
                if isinstance(v, core.ClosedJaxpr):
                    yield name, v.jaxpr
                elif isinstance(v, core.Jaxpr):
                    yield name, v


def jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        if prim == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif prim == "dot_general":
            total += _dot_flops(eqn)
        else:
            subs = list(sub_jaxprs(eqn))
            if prim == "cond":  # one branch runs: count the most expensive
                total += max((jaxpr_flops(j) for _, j in subs), default=0)
                continue
            mult = eqn.params.get("length", 1) if prim == "scan" else 1
            for _, sub in subs:
                total += mult * jaxpr_flops(sub)
    return total


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs (2 per multiply-add) of one call of fn(*args, **kwargs)."""
    return jaxpr_flops(jax.make_jaxpr(fn, **kwargs)(*args).jaxpr)
