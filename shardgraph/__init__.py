"""shardgraph: a functional sharding compiler over torch.fx for Mixture-of-Experts training.

Layers, each importing only those below it:
    core      mesh, placement, meta, fx_graph, ops, runtime, frontend
    passes    the top-level ``passes`` package (propagation, lowering, the pipeline)
    driver    compile, program, report, dump, check, checkpoint, cli
"""

from .mesh import MeshError, MeshSpec
from .placement import (
    InterleavedShard,
    Partial,
    Placement,
    Replicate,
    Shard,
    Sharding,
    ShardingError,
    local_shape,
    run_plan,
    shard,
    to_dtensor_placements,
    unshard,
)
from .runtime import CollectiveError, Simulator
from . import optim
from .frontend import AdapterError, TracedGraph, TraceError, op_histogram, register_experts, trace

# The driver (compile, program) sits above the passes, which import this package's core modules
# (mesh, placement, meta, runtime): loaded on first use, so importing ``passes`` never loads it.
_DRIVER = {"compile": ".compiler", "compile_traced": ".compiler", "ShardedProgram": ".program",
           "TrainingProgram": ".training", "TrainState": ".training"}


def __getattr__(name: str):
    if name in _DRIVER:
        import importlib

        found = getattr(importlib.import_module(_DRIVER[name], __name__), name)
        globals()[name] = found
        return found
    raise AttributeError(f"module 'shardgraph' has no attribute {name!r}")


__version__ = "0.1.0"


__all__ = [
    "MeshError",
    "MeshSpec",
    "Placement",
    "Replicate",
    "Shard",
    "InterleavedShard",
    "Partial",
    "Sharding",
    "ShardingError",
    "local_shape",
    "run_plan",
    "shard",
    "unshard",
    "to_dtensor_placements",
    "Simulator",
    "CollectiveError",
    "compile",
    "compile_traced",
    "trace",
    "TracedGraph",
    "TraceError",
    "register_experts",
    "AdapterError",
    "op_histogram",
    "ShardedProgram",
    "TrainingProgram",
    "TrainState",
    "optim",
]
