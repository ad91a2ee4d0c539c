"""Parity fuzzer, long form: draw cases from a seeded ``random.Random``, judge each, tabulate.

A case is a variant of the bundled MoE model (shared experts, qk-norm, GQA, top-k, batch- and
sequence-mixing ops, tied embeddings, frozen parameters, padding, loss variants), a mesh (world up
to 16, some meshes MeshSpec must refuse), a plan (default, subsets, random valid and invalid
styles) and a batch sharding; ``tests/fuzz_cases.py`` draws and judges them. Every case is either
refused before any work with a named error or matches the unsharded model within 1e-5; anything
else is a failure, printed, shrunk (options dropped one at a time while it still fails the same
way) and printed again as a reproduction script.

Usage: ``python benchmarks/fuzz_parity.py --cases 2000 --seed 0 [--budget-s 1800] [--out PATH]``.
Case ``i`` is drawn from ``random.Random(f"{seed}:{i}")``, so ``--only i`` replays one case.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tests.fuzz_cases import RandomDraw, draw_case, judge, shrink  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fuzz_parity.json")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library_fingerprint() -> dict:
    """The commit and a hash of the library's sources as they are on disk now (others edit the
    working tree while a run goes on; a changed hash means the run saw more than one version)."""
    import hashlib
    import subprocess

    digest = hashlib.sha256()
    for top in ("shardgraph", "passes", "kernels", "examples"):
        for root, dirs, files in sorted(os.walk(os.path.join(REPO, top))):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    digest.update(os.path.relpath(path, REPO).encode())
                    with open(path, "rb") as handle:
                        digest.update(handle.read())
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"commit": commit, "sources_sha256": digest.hexdigest()[:16], "at": time.strftime("%Y-%m-%d %H:%M:%S")}


def features(case) -> dict:
    """What a case exercises, for the outcome-by-feature table."""
    world, tp, ep, etp = case.mesh
    plan = "default" if case.plan is None else f"{len(case.plan)} entries"
    return {"world": world, "tp>1": tp != 1, "ep>1": ep != 1, "etp>1": etp != 1, "mixing": case.mixing is not None,
            "replicate_fallback": case.replicate_fallback, "batch_sharding": case.batch_sharding,
            "loss": case.loss, "labels_input": case.labels_input, "attn_mask": case.attn_mask,
            "padding": case.pad_side if case.padding else None, "tied": case.tied, "frozen": bool(case.frozen),
            "shared_expert": bool(case.config.get("shared_expert_intermediate_size")),
            "qk_norm": bool(case.config.get("qk_norm")), "rotary": bool(case.config.get("rotary")),
            "plan": plan if case.plan is None or not case.plan
            else "explicit", **training_features(case)}


def training_features(case) -> dict:
    if case.training is None:
        return {"training": False}
    options = case.training_options()
    # The clipping threshold as whether there is one (the table's rows are values seen).
    return {"training": True, **options, "clip_grad_norm": options["clip_grad_norm"] is not None}


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


def _judge_index(job):
    """One case, in a worker: ``(index, case, verdict)``."""
    seed, index, case_limit_s, threads, training_rate = job
    torch.set_num_threads(threads)
    case = draw_case(RandomDraw(case_rng(seed, index)), seed=index % 4, training_rate=training_rate)
    return index, case, judge(case, time_limit=case_limit_s)


def _verdicts(args, indices):
    """``(index, case, verdict)`` in index order; ``--jobs`` worker processes judge ahead."""
    jobs = [(args.seed, index, args.case_limit_s, args.threads, args.training_rate) for index in indices]
    if args.jobs <= 1:
        yield from map(_judge_index, jobs)
        return
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(args.jobs)
    try:
        yield from pool.imap(_judge_index, jobs)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=1800.0, help="stop drawing new cases after this long")
    parser.add_argument("--case-limit-s", type=float, default=180.0, help="a case running longer is a hang")
    parser.add_argument("--only", type=int, nargs="*", help="judge only these case indices")
    parser.add_argument("--no-shrink", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the simulator runs "
                                                                 "ranks as threads already)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes judging cases (shrinking runs "
                                                             "in the main process)")
    parser.add_argument("--training-rate", type=float, default=0.3,
                        help="share of cases that compile the whole training step (an optimizer, clipping, "
                             "zero, recompute, the fused updates; float64 against torch.optim), the rest being "
                             "gradient programs; 0 draws the cases of runs before training cases existed")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    indices = args.only if args.only else range(args.cases)
    fingerprint_start = library_fingerprint()
    started = time.perf_counter()
    outcomes = collections.Counter()
    refusals = collections.Counter()
    failures, records, notes = [], [], collections.Counter()
    by_feature = collections.defaultdict(collections.Counter)
    examples = {}
    judge_seconds = 0.0
    stopped_early = False
    verdicts = _verdicts(args, list(indices))
    for count, (index, case, verdict) in enumerate(verdicts):
        if time.perf_counter() - started > args.budget_s:
            stopped_early = True
            print(f"time budget {args.budget_s:.0f}s spent after {count} cases; stopping", flush=True)
            verdicts.close()
            break
        judge_seconds += verdict.seconds
        outcome = verdict.outcome if not (verdict.outcome == "failed" and verdict.known) else "failed (known)"
        outcomes[outcome] += 1
        for note in verdict.notes:
            notes[note.split(": ")[0]] += 1
        if verdict.outcome == "refused":
            refusals[verdict.reason] += 1
        # One short row per case (the case itself is redrawn from --seed and its index: --only).
        records.append([index, verdict.outcome, verdict.reason, round(verdict.seconds, 2)])
        for name, value in features(case).items():
            by_feature[f"{name}={value}"][verdict.outcome] += 1
        if verdict.outcome == "refused" and verdict.reason not in examples:
            examples[verdict.reason] = {"index": index, "message": verdict.detail[:300]}
        if verdict.outcome == "failed":
            print(f"\nFAILED case {index} ({verdict.reason}{', known: ' + verdict.known if verdict.known else ''}):"
                  f" {case.short()}\n{verdict.detail}", flush=True)
            entry = {"index": index, "reason": verdict.reason, "known": verdict.known, "detail": verdict.detail,
                     "case": case.to_json(), "sources_at_failure": library_fingerprint()}
            if not args.no_shrink and not verdict.known:
                small, small_verdict = shrink(case, verdict, log=lambda line: print(line, flush=True))
                print(f"shrunk to ({small_verdict.reason}): {small.short()}\n{small_verdict.detail}\n"
                      f"--- reproduction ---\n{small.repro()}", flush=True)
                entry.update(shrunk=small.to_json(), shrunk_reason=small_verdict.reason,
                             shrunk_detail=small_verdict.detail, repro=small.repro())
            failures.append(entry)
        elif not args.quiet and (count + 1) % 50 == 0:
            elapsed = time.perf_counter() - started
            print(f"{count + 1} cases, {elapsed:.0f}s, {(count + 1) / elapsed:.2f} cases/s: "
                  f"{dict(outcomes)}", flush=True)

    elapsed = time.perf_counter() - started
    judged = len(records)
    fingerprint_end = library_fingerprint()
    if fingerprint_end["sources_sha256"] != fingerprint_start["sources_sha256"]:
        print(f"\nWARNING: the library's sources changed during the run ({fingerprint_start} -> {fingerprint_end}); "
              f"worker processes judged the version they imported at start, so replay any failure on the tree now")
    print(f"\nparity fuzz: seed {args.seed}, {judged} cases in {elapsed:.0f}s "
          f"({judged / max(elapsed, 1e-9):.2f} cases/s; {args.jobs} job(s); {judge_seconds:.0f}s judging in all)")
    print(f"{'outcome':<80} {'cases':>6}")
    print(f"{'passed (parity within 1e-5; training steps in float64 within 1e-8)':<80} {outcomes['passed']:>6}")
    print(f"{'refused, by reason:':<80} {outcomes['refused']:>6}")
    for reason, n in refusals.most_common():
        print(f"  {reason[:78]:<78} {n:>6}")
    print(f"{'failed':<80} {outcomes['failed']:>6}")
    if outcomes["failed (known)"]:
        print(f"{'failed, in a known class (see tests/fuzz_cases.py KNOWN_FAILURES)':<80} "
              f"{outcomes['failed (known)']:>6}")
    for note, n in notes.most_common():
        print(f"note: {note} ({n} cases)")
    print("\npassed / refused / failed by feature:")
    for name, counts in sorted(by_feature.items()):
        print(f"  {name:<36} {counts['passed']:>5} {counts['refused']:>5} {counts['failed']:>3}")
    result = {
        "seed": args.seed,
        "training_rate": args.training_rate,
        "library_at_start": fingerprint_start,
        "library_at_end": fingerprint_end,
        "cases_requested": args.cases if not args.only else len(args.only),
        "cases_judged": judged,
        "stopped_early": stopped_early,
        "seconds": round(elapsed, 1),
        "cases_per_second": round(judged / max(elapsed, 1e-9), 3),
        "outcomes": {"passed": outcomes["passed"], "refused": outcomes["refused"], "failed": outcomes["failed"],
                     "failed_known": outcomes["failed (known)"]},
        "refusals": dict(refusals.most_common()),
        "refusal_examples": examples,
        "notes": dict(notes.most_common()),
        "outcomes_by_feature": {k: dict(v) for k, v in sorted(by_feature.items())},
        "failures": failures,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "torch_threads": args.threads, "jobs": args.jobs, "platform": platform.platform()},
        "cases_columns": ["index", "outcome", "reason", "seconds"],
        "cases": records,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1, default=str)
        print(f"wrote {args.out}")
    return 1 if outcomes["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
