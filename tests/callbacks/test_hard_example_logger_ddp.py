"""Under DDP (2 CPU processes, gloo) the logged top-k is the global one and the dynamics are combined by id."""

import json
from pathlib import Path

import pytest

from tests.callbacks.test_hard_example_logger import TAG, expected_tables, markdown_rows
from tests.helpers import read_events, run_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "scripts" / "hard_examples_ddp.py"


def test_ddp_logs_the_global_top_k_and_combines_dynamics_by_id(tmp_path):
    run_script(SCRIPT, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = [tuple(s) for rank in ranks for s in rank["seen"]]
    # The distributed sampler reshuffles each epoch: some ids are seen on one rank, then on the other.
    both = {s[1] for s in ranks[0]["seen"]} & {s[1] for s in ranks[1]["seen"]}
    assert both

    expected = expected_tables(seen, 3, [0, 2, 4])
    texts = read_events(str(tmp_path / "ddp" / "version_0")).Tensors(f"{TAG}/text_summary")
    assert [t.step for t in texts] == [0, 2, 4]
    from_rank = {0: 0, 1: 0}
    for event in texts:
        rows = markdown_rows(event.tensor_proto.string_val[0].decode())
        want = [("window", r) for r in expected[event.step]["window"]] + [("run", r) for r in expected[event.step]["run"]]
        assert [(r["scope"], int(r["step"]), int(r["id"])) for r in rows] == [(s, r[0], r[1]) for s, r in want]
        for row, (_, (_, i, loss, _)) in zip(rows, want):
            assert float(row["loss"]) == pytest.approx(loss, rel=1e-5)
            assert row["text"] and row["saliency"]  # rendered (and attributed) on the rank that held the example
            on_zero = (int(row["step"]), i) in {(s[0], s[1]) for s in ranks[0]["seen"]}
            from_rank[0 if on_zero else 1] += 1
    assert from_rank[0] and from_rank[1]  # the global top-k drew on both ranks
    assert ranks[0]["last_logged"] == ranks[1]["last_logged"]  # every rank keeps the same rows

    assert ranks[0]["scores"] == ranks[1]["scores"]
    scores = ranks[0]["scores"]
    for j, i in enumerate(scores["id"]):
        losses = [loss for _, seen_id, loss, _ in seen if seen_id == i]
        assert scores["presentations"][j] == len(losses) and len(losses) >= 1
        assert scores["mean_loss"][j] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
        assert i not in both or scores["presentations"][j] >= 2  # combined across the ranks that saw it
    assert sorted(scores["id"]) == sorted({s[1] for s in seen})
