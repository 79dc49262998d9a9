"""The algorithms: the registry that maps names to config classes, and every registered one.

An algorithm module registers its class with `distsgd.algorithms.registry.register` (not this
package, which imports every module: importing from here would make each one a cycle with it).
"""

from __future__ import annotations

from distsgd.algorithms.base import Algorithm, WorkerContext, hyperparameter
from distsgd.algorithms.registry import (
    REGISTRY,
    create,
    get,
    parse_settings,
    parse_value,
    register,
)

# isort: split
# Importing the modules registers them (after `register` is bound here, for modules that still
# import it from this package).
from distsgd.algorithms import (  # noqa: F401
    adpsgd,
    allreduce,
    async_sparse,
    crossover,
    diloco,
    downpour,
    easgd,
    easgd_async,
    gosgd,
    local_sgd,
    powersgd,
    sgp,
    ssp,
)

__all__ = ["REGISTRY", "Algorithm", "WorkerContext", "create", "get", "hyperparameter",
           "parse_settings", "parse_value", "register"]
