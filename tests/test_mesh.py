"""The folded mesh: derived sizes, TP-lane-major rank order, group tables, refusals."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardgraph.mesh import MeshError, MeshSpec


def singletons(n):
    return [(r,) for r in range(n)]


# Hand-derived from rank = dp * tp + tp_index and rank = edp * ep * etp + ep_index * etp + etp_index.
PINNED = {
    "world=8,tp=2,ep=4": dict(
        dp=4, edp=2,
        tp=[(0, 1), (2, 3), (4, 5), (6, 7)],
        dp_groups=[(0, 2, 4, 6), (1, 3, 5, 7)],
        ep=[(0, 1, 2, 3), (4, 5, 6, 7)],
        etp=singletons(8),
        edp_groups=[(0, 4), (1, 5), (2, 6), (3, 7)],
    ),
    "world=4,tp=4,ep=4": dict(
        dp=1, edp=1,
        tp=[(0, 1, 2, 3)],
        dp_groups=singletons(4),
        ep=[(0, 1, 2, 3)],
        etp=singletons(4),
        edp_groups=singletons(4),
    ),
    "world=4,tp=2,ep=4": dict(
        dp=2, edp=1,
        tp=[(0, 1), (2, 3)],
        dp_groups=[(0, 2), (1, 3)],
        ep=[(0, 1, 2, 3)],
        etp=singletons(4),
        edp_groups=singletons(4),
    ),
    "world=8,tp=4,ep=4": dict(
        dp=2, edp=2,
        tp=[(0, 1, 2, 3), (4, 5, 6, 7)],
        dp_groups=[(0, 4), (1, 5), (2, 6), (3, 7)],
        ep=[(0, 1, 2, 3), (4, 5, 6, 7)],
        etp=singletons(8),
        edp_groups=[(0, 4), (1, 5), (2, 6), (3, 7)],
    ),
    "world=8,tp=2,ep=2,etp=2": dict(
        dp=4, edp=2,
        tp=[(0, 1), (2, 3), (4, 5), (6, 7)],
        dp_groups=[(0, 2, 4, 6), (1, 3, 5, 7)],
        ep=[(0, 2), (1, 3), (4, 6), (5, 7)],
        etp=[(0, 1), (2, 3), (4, 5), (6, 7)],
        edp_groups=[(0, 4), (1, 5), (2, 6), (3, 7)],
    ),
    "world=1": dict(dp=1, edp=1, tp=[(0,)], dp_groups=[(0,)], ep=[(0,)], etp=[(0,)], edp_groups=[(0,)]),
}


@pytest.mark.parametrize("text", sorted(PINNED))
def test_group_tables_match_hand_derived_tables(text):
    mesh = MeshSpec.parse(text)
    expected = PINNED[text]
    assert (mesh.dp, mesh.edp) == (expected["dp"], expected["edp"])
    assert mesh.groups("tp") == expected["tp"]
    assert mesh.groups("dp") == expected["dp_groups"]
    assert mesh.groups("ep") == expected["ep"]
    assert mesh.groups("etp") == expected["etp"]
    assert mesh.groups("edp") == expected["edp_groups"]
    assert mesh.groups(("dp", "tp")) == [tuple(range(mesh.world))]
    table = mesh.group_table()
    assert table["ep*etp"] == mesh.groups(("ep", "etp"))


def test_ep_etp_product_group_spans_one_edp_replica():
    mesh = MeshSpec(8, tp=2, ep=2, etp=2)
    assert mesh.groups(("ep", "etp")) == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_cross_lane_ep_group_spans_tp_lanes_and_dp_ranks():
    mesh = MeshSpec(4, tp=2, ep=4)
    ep_group = mesh.group_of("ep", 0)
    assert {mesh.coords(r)["tp"] for r in ep_group} == {0, 1}
    assert {mesh.coords(r)["dp"] for r in ep_group} == {0, 1}


def test_pipeline_stages_repeat_the_stage_tables():
    mesh = MeshSpec(8, tp=2, ep=2, pp=2)
    assert mesh.stage == 4
    assert mesh.groups("pp") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert mesh.groups("tp") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert mesh.groups("dp") == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert mesh.groups("edp") == [(0, 2), (1, 3), (4, 6), (5, 7)]


def test_coordinates_round_trip_on_both_views():
    mesh = MeshSpec(16, tp=2, ep=2, etp=2, pp=2)
    for rank in mesh.ranks:
        c = mesh.coords(rank)
        assert mesh.rank_of(pp=c["pp"], dp=c["dp"], tp=c["tp"]) == rank
        assert mesh.rank_of(pp=c["pp"], edp=c["edp"], ep=c["ep"], etp=c["etp"]) == rank
        assert mesh.index("tp", rank) == mesh.group_of("tp", rank).index(rank)
        assert mesh.index(("ep", "etp"), rank) == mesh.group_of(("ep", "etp"), rank).index(rank)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(world=6, pp=4), "world % pp != 0"),
        (dict(world=8, ep=3), "stage % (ep*etp) != 0"),
        (dict(world=8, ep=4, etp=4), "ep=4 x etp=4 = 16"),
        (dict(world=8, tp=3), "stage % tp != 0"),
        (dict(world=0), "world=0 must be positive"),
        (dict(world=8, tp=-2), "tp=-2 must be positive"),
        (dict(world=8, ep=2.0), "ep=2.0 must be an int"),
    ],
)
def test_invalid_meshes_are_refused_naming_the_numbers(kwargs, fragment):
    with pytest.raises(MeshError, match=None) as info:
        MeshSpec(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("world=8,dp=2", "dp cannot be set"),
        ("world=8,edp=2", "edp cannot be set"),
        ("tp=2", "does not give world"),
        ("world=8,tq=2", "unknown mesh size 'tq'"),
        ("world=8,tp", "expected name=integer"),
        ("world=8,tp=2,tp=2", "given twice"),
    ],
)
def test_mesh_strings_are_parsed_or_refused_with_the_rule(text, fragment):
    with pytest.raises(MeshError) as info:
        MeshSpec.parse(text)
    assert fragment in str(info.value)


def test_questions_about_unknown_axes_and_ranks_are_refused():
    mesh = MeshSpec(8, tp=2, ep=4)
    with pytest.raises(MeshError, match="unknown mesh axis 'xp'"):
        mesh.groups("xp")
    with pytest.raises(MeshError, match="mix the dense view"):
        mesh.groups(("tp", "ep"))
    with pytest.raises(MeshError, match="rank 8 is outside"):
        mesh.coords(8)


def test_describe_prints_both_views_and_groups():
    text = MeshSpec(8, tp=2, ep=4).describe()
    assert "dense view  dp x tp = 4 x 2" in text
    assert "ep groups      {0,1,2,3} {4,5,6,7}" in text


@st.composite
def valid_meshes(draw):
    tp = draw(st.sampled_from([1, 2, 4]))
    ep = draw(st.sampled_from([1, 2, 4]))
    etp = draw(st.sampled_from([1, 2]))
    pp = draw(st.sampled_from([1, 2]))
    # The smallest stage both views can fold onto, times a free data-parallel factor.
    base = tp * ep * etp // _gcd(tp, ep * etp)
    stage = base * draw(st.sampled_from([1, 2, 3]))
    return MeshSpec(world=stage * pp, tp=tp, ep=ep, etp=etp, pp=pp)


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


@given(valid_meshes())
def test_every_axis_partitions_the_ranks_and_views_agree(mesh):
    for axis in ("tp", "dp", "ep", "etp", "edp", "pp", ("dp", "tp"), ("ep", "etp")):
        groups = mesh.groups(axis)
        flat = sorted(r for g in groups for r in g)
        assert flat == list(mesh.ranks)
        assert all(len(g) == mesh.size(axis) for g in groups)
    assert mesh.dp * mesh.tp == mesh.edp * mesh.ep * mesh.etp == mesh.stage
