"""shardgraph: a functional sharding compiler over torch.fx for Mixture-of-Experts training."""

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
from .compile import compile, compile_traced  # noqa: E402  (after mesh/placement: the passes import them)
from .frontend import AdapterError, TracedGraph, TraceError, op_histogram, register_experts, trace  # noqa: E402
from .program import ShardedProgram  # noqa: E402

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
]
