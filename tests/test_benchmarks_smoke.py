"""The GPU check script runs end to end on tiny CPU shapes (its correctness section must pass)."""

import json

from benchmarks import head_check


import pytest


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_check_smoke(tmp_path, backend):
    assert head_check.main(["--smoke", "--backend", backend, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "head_check.json").read_text())
    checks = [r for r in data["rows"] if "case" in r]
    assert len(checks) == 4 and all(r["pass"] for r in checks)
    assert any(r.get("impl") == "fastpref" and r["median_ms"] > 0 for r in data["rows"])
    assert (tmp_path / "head_check.md").read_text().startswith("# Fused head check")


def test_methods_step_smoke(tmp_path):
    from benchmarks import methods_step

    assert methods_step.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "methods_step.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"dpo", "ipo", "simpo", "pro-pairwise", "pro-binary", "pro-scalar", "dro",
                                         "typo", "auxdpo", "drdo"}
    assert all(r["median_ms"] > 0 for r in rows)


def test_trl_step_smoke(tmp_path):
    pytest.importorskip("trl")
    from benchmarks import trl_step

    assert trl_step.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "trl_step.json").read_text())["rows"]}
    assert set(rows) == {"stock", "fastpref"}
    assert rows["fastpref"]["first_loss"] == pytest.approx(rows["stock"]["first_loss"], rel=1e-4)
