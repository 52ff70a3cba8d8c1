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


def test_compare_smoke(tmp_path):
    """The side-by-side comparison runs its default matrix on tiny shapes; absent anchors are rows, not failures."""
    import importlib.util

    from benchmarks import compare

    assert compare.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["meta"]["device"] and data["meta"]["torch"] and data["meta"]["date"]
    rows = data["rows"]
    for case in compare.CASES:
        ok = {r["impl"] for r in rows if r["case"] == case and r["status"] == "ok"}
        assert {"matmul", "fastpref", "naive"} <= ok, case
    fp = [r for r in rows if r["impl"] == "fastpref"]
    assert len(fp) == 8 + 3  # the Llama-3-8B head's prompt x mode x data cross, one row for each other case
    assert {(r["prompt_frac"], r["mode"], r["data"]) for r in fp if r["case"] == "llama3-8b"} == {
        (p, m, d) for p in (0.0, 0.5) for m in ("full", "frozen") for d in ("gaussian", "peaked")}
    assert all(r["median_ms"] > 0 and r["units"] > 0 and r["loss_rel_err"] < 1e-3 for r in fp)
    assert all(r["softcap"] == 30.0 for r in rows if r["case"] == "gemma2-2b")
    anchors = [r for r in rows if r["impl"] in ("liger", "cce")]
    assert len(anchors) == 2 * len(fp) and all(r["status"] in ("ok", "missing", "unsupported") for r in anchors)
    assert (tmp_path / "compare.md").read_text().startswith("# fastpref vs naive")
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "compare_units.png").stat().st_size > 0


def test_compare_sweep_and_selection(tmp_path):
    import importlib.util

    from benchmarks import compare

    argv = ["--smoke", "--sweep", "--cases", "qwen2.5-7b", "--prompt-fracs", "0", "--modes", "frozen",
            "--data", "peaked", "--impls", "fastpref", "--out", str(tmp_path)]
    assert compare.main(argv) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    matrix = [r for r in rows if r["section"] == "matrix" and r["impl"] != "matmul"]
    assert [(r["case"], r["prompt_frac"], r["mode"], r["data"], r["impl"]) for r in matrix] == [
        ("qwen2.5-7b", 0.0, "frozen", "peaked", "fastpref")]
    sweep = [r for r in rows if r["section"] == "sweep" and r["impl"] == "fastpref"]
    assert [r["pairs"] for r in sweep] == [1, 2] and all(r["status"] == "ok" for r in sweep)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "compare_time.png").exists() and (tmp_path / "compare_memory.png").exists()


def test_compare_exit_status(tmp_path, monkeypatch):
    """A failing baseline (naive out of memory) is a row; a failing fastpref fails the run."""
    import torch

    from benchmarks import compare, head_check

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    monkeypatch.setattr(head_check, "naive_step", oom)
    argv = ["--smoke", "--cases", "long", "--impls", "fastpref,naive", "--out", str(tmp_path)]
    assert compare.main(argv) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "compare.json").read_text())["rows"]}
    assert rows["naive"]["status"] == "oom" and rows["fastpref"]["status"] == "ok"
    monkeypatch.setattr(head_check, "fastpref_step", lambda backend: oom)
    assert compare.main(argv) == 1


def test_bench_head_suite_smoke(tmp_path):
    """The pytest-benchmark suites collect and run on tiny CPU shapes (``--smoke``); on CUDA they are the real ones."""
    import os
    import subprocess
    import sys

    pytest.importorskip("pytest_benchmark")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", os.path.join(root, "benchmarks"), "--benchmark-only",
                           "--smoke", "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {b["name"] for b in json.loads(out.read_text())["benchmarks"]}
    assert {"test_policy_forward[full]", "test_policy_backward[frozen]", "test_dpo_step[full]",
            "test_module_step[dpo]", "test_module_step[auxdpo]"} <= names


def test_exactness_smoke(tmp_path):
    from benchmarks import exactness

    assert exactness.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "exactness.json").read_text())["rows"]}
    assert rows["float64"]["abs_err"] == 0.0
    # fp32 on tiny shapes: every computation within fp32 rounding of the float64 loss
    assert all(r["abs_err"] < 1e-5 for r in rows.values()), rows
