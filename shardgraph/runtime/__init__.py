"""Runtimes for lowered per-rank programs: the in-process simulator and torch.distributed."""

from .simulate import CollectiveError, CollectiveRecord, RankCommunicator, Simulator, collective_bytes

__all__ = ["CollectiveError", "CollectiveRecord", "RankCommunicator", "Simulator", "collective_bytes"]
