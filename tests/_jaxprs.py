"""Walking a jaxpr together with the jaxprs nested in its equations (loop bodies, branches)."""

from __future__ import annotations

from collections.abc import Iterator

from jax.extend import core


def nested_jaxprs(jaxpr: core.Jaxpr) -> Iterator[core.Jaxpr]:
    """`jaxpr`, then every jaxpr in its equations' parameters, depth first."""
    yield jaxpr
    for eqn in jaxpr.eqns:
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, core.ClosedJaxpr):
                    yield from nested_jaxprs(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    yield from nested_jaxprs(sub)
