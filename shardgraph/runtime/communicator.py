"""What a lowered program needs from its communicator input: one rank's collectives.

The simulator's ``RankCommunicator`` and torch.distributed's ``DistributedCommunicator`` both
satisfy it, so the same lowered GraphModule runs under either; a third backend implements these
methods and nothing else. Every method takes and returns this rank's local tensor; ``axis`` names
one mesh axis or a tuple of axes of one view.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from ..mesh import AxisName, MeshSpec

__all__ = ["Communicator"]


@runtime_checkable
class Communicator(Protocol):
    mesh: MeshSpec
    rank: int

    def all_reduce(self, tensor: torch.Tensor, axis: AxisName, op: str = "sum", tag: str = "") -> torch.Tensor: ...

    def all_gather(self, tensor: torch.Tensor, axis: AxisName, dim: int = 0, sizes: Sequence[int] | None = None,
                   tag: str = "") -> torch.Tensor: ...

    def reduce_scatter(self, tensor: torch.Tensor, axis: AxisName, dim: int = 0, op: str = "sum",
                       tag: str = "") -> torch.Tensor: ...

    def all_to_all(self, tensor: torch.Tensor, axis: AxisName, input_splits: Sequence[int], dim: int = 0,
                   output_splits: Sequence[int] | None = None, tag: str = "") -> torch.Tensor: ...

    def broadcast(self, tensor: torch.Tensor, axis: AxisName, source_index: int = 0, tag: str = "") -> torch.Tensor: ...

    def group(self, axis: AxisName) -> tuple[int, ...]: ...

    def index(self, axis: AxisName) -> int: ...
