"""``gather_parameter``: a parameter held split over the data-parallel axes (ZeRO-3), needed
whole over them by its readers.

On dp and edp the output is ``Replicate`` and the input is asked for ``Replicate``, so lowering
all-gathers the held slices; on every other axis the parameter's own split (tp, ep, etp) passes
through unchanged, which is what its readers were placed against."""

from __future__ import annotations

from shardgraph.placement import Replicate

from ..gather_parameters import gather_parameter
from . import AxisCandidate, register

_DATA_PARALLEL_AXES = ("dp", "edp")


@register(gather_parameter, family="parameter gather")
def rule_gather_parameter(ctx, axis, placements):
    if axis in _DATA_PARALLEL_AXES:
        return [AxisCandidate((Replicate(),), Replicate(), "gathered over the data-parallel axis for its readers")]
    return [AxisCandidate(placements, placements[0])]
