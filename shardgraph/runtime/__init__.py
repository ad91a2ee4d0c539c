"""Runtimes for lowered per-rank programs: the in-process simulator and torch.distributed."""

from .communicator import Communicator
from .simulate import CollectiveError, CollectiveRecord, RankCommunicator, Simulator, collective_bytes

__all__ = ["Communicator", "CollectiveError", "CollectiveRecord", "RankCommunicator", "Simulator", "collective_bytes"]
