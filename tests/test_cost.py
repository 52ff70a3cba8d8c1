"""``python -m benchmarks.cost`` at the real shapes (meta tensors, seconds on the CPU): issue 8's counted targets.

Counting is not timing: these are exact statements about the work the code issues (matrix units, atomics,
peak live memory), so a change that adds a unit, computes prompt rows, adds an atomic or grows the workspace
fails here before any GPU sees it.
"""

import json

from benchmarks import cost


def test_cost_targets_at_real_shapes(tmp_path):
    assert cost.main(["--out", str(tmp_path), "--no-naive"]) == 0
    rows = {r["case"]: r for r in json.loads((tmp_path / "cost.json").read_text())["rows"]}
    full, frozen = rows["llama3-8b"], rows["llama3-8b frozen head"]
    assert abs(full["units"] - 2.5) < 0.02 and abs(frozen["units"] - 1.5) < 0.02
    assert abs(rows["llama3-8b no prompt"]["units"] - 5.0) < 0.04  # prompt rows are gathered out, never computed
    for r in rows.values():
        assert r["backward_atomics"] == 0 and r["peak_extra_mib"] < 64
        assert r["phases"]["backward"]["units"] <= 3 * r["phases"]["policy forward"]["units"] + 1e-6
    assert (tmp_path / "cost.md").read_text().startswith("| case |")


def test_cost_counts_the_naive_head_too():
    naive = cost.count(cost.CASES[0], "naive")
    assert naive["units"] > 3.9 and naive["peak_extra_mib"] > 20 * 1024  # materialized logits: ~22 GiB


def test_tune_head_smoke(tmp_path):
    from benchmarks import tune_head

    assert tune_head.main(["--smoke", "--iters", "1", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "tune_head.json").read_text())["rows"]
