"""No silent wrong result: random model variants, meshes, plans and batch shardings are either
refused before any work with a named error or match the unsharded model within 1e-5; whole
training steps (drawn optimizers, clipping, zero, recompute, fused updates) match torch.optim on
the unsharded model in float64.

The short form of ``benchmarks/fuzz_parity.py`` (which runs 2000 cases): Hypothesis draws the
cases (``tests/fuzz_cases.py``), derandomized so CI sees the same ones every run, and shrinks a
failure to its simplest case, printed with a reproduction script.
"""

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tests.fuzz_cases import HypothesisDraw, draw_case, judge

EXAMPLES = 40  # about 25-50 s on a 2-core CPU machine shared with other work
TRAINING_EXAMPLES = 10  # whole training steps (about 1.5 s each): optimizers, clipping, zero, recompute


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The simulator runs every rank as a thread; torch's own intra-op threads on top only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_every_case_is_refused_by_name_or_matches_the_unsharded_model(data):
    draw = HypothesisDraw(data)
    case = draw_case(draw, seed=draw.integer(0, 3))
    note(f"case: {case.short()}")
    verdict = judge(case)
    note(f"verdict: {verdict.outcome} {verdict.reason} {verdict.errors} {verdict.notes}")
    event(verdict.outcome if verdict.outcome != "refused" else f"refused: {verdict.reason}")
    if verdict.outcome == "failed" and verdict.known:
        return  # a class of failure marked in tests/fuzz_cases.py KNOWN_FAILURES, reported there
    assert verdict.outcome != "failed", (
        f"{verdict.reason}\n{verdict.detail}\ncase: {case.short()}\n--- reproduction ---\n{case.repro()}")


@settings(max_examples=TRAINING_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_every_training_step_case_is_refused_by_name_or_matches_torch_optim(data):
    draw = HypothesisDraw(data)
    case = draw_case(draw, seed=draw.integer(0, 3), training_rate=1.0)
    assert case.training is not None
    note(f"case: {case.short()}")
    verdict = judge(case)
    note(f"verdict: {verdict.outcome} {verdict.reason} {verdict.errors} {verdict.notes}")
    event(verdict.outcome if verdict.outcome != "refused" else f"refused: {verdict.reason}")
    assert verdict.outcome != "failed", (
        f"{verdict.reason}\n{verdict.detail}\ncase: {case.short()}\n--- reproduction ---\n{case.repro()}")


def test_a_case_with_dropout_is_arbitrated_against_float64_drawing_the_same_masks():
    # Dropout after the embedding, top-1 of 2 experts (router gradients zero in exact arithmetic)
    # and a batch-mixing head: check.parity_errors flags the zero router gradients as noise, and
    # the float64 arbiter must then run the model with the masks the program drew (seed 0). It
    # once drew fresh ones and failed a right program on "wrong numbers (loss)".
    from tests.fuzz_cases import Case

    case = Case.from_json({
        "config": {"vocab_size": 32, "hidden_size": 32, "num_heads": 1, "num_kv_heads": 1, "num_experts": 2,
                   "top_k": 1, "moe_intermediate_size": 12, "shared_expert_intermediate_size": 8},
        "mixing": "sub_mean0", "mixing_at": "head", "pad_mask": False, "tied": True, "frozen": [], "loss": "smooth",
        "labels_input": False, "padding": 0, "pad_side": "right", "attn_mask": None, "mesh": [1, 1, 1, 1],
        "plan": None, "batch_sharding": "none", "replicate_fallback": False, "dropout": True, "batch": 8, "seq": 4,
        "seed": 0})
    verdict = judge(case)
    assert verdict.outcome == "passed", (verdict.reason, verdict.detail)
    assert any("zero in exact arithmetic" in note for note in verdict.notes), verdict.notes
