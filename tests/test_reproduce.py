"""``fastpref reproduce``: every listed paper claim holds through fastpref's public API (CI runs this), and the
command's output, files and exit status."""

from __future__ import annotations

import json

import pytest

from fastpref.cli import main
from fastpref.reproduce import CLAIMS, ClaimResult, run_claims


def test_every_paper_claim_is_reproduced(tmp_path, capsys):
    rc = main(["reproduce", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{len(CLAIMS)} of {len(CLAIMS)} paper claims reproduced" in out
    rows = json.loads((tmp_path / "reproduce.json").read_text())
    assert [r["name"] for r in rows] == list(CLAIMS) and all(r["passed"] for r in rows)
    assert (tmp_path / "reproduce.png").stat().st_size > 10_000
    by_name = {r["name"]: r["details"] for r in rows}
    # the numbers the claims are about (the paper's side is in each claim's module docstring)
    assert by_name["auxdpo-prop2"]["theta"]["dpo"] == pytest.approx(0.91, abs=0.01)
    assert by_name["auxdpo-prop2"]["theta"]["auxdpo"] < 0
    assert by_name["dro-offset"]["slope"] == pytest.approx(-0.1, rel=1e-3)
    assert max(abs(a - b) for a, b in zip(by_name["typo-bandit"]["pi"]["typo"], (0.6, 0.3, 0.1))) < 0.02
    assert by_name["pro-dpo-identity"]["gradient_error"] < 1e-12
    assert by_name["drdo-gradient"]["median_dropped_over_kept"] > 10


def test_a_claim_that_does_not_hold_fails_the_command(tmp_path, monkeypatch, capsys):
    from fastpref import reproduce

    registry = reproduce._registry

    def broken():
        table = registry()
        table["pro-existence"] = lambda: ClaimResult("pro-existence", "t", "paper", "fastpref", passed=False)
        return table

    monkeypatch.setattr(reproduce, "_registry", broken)
    rc = main(["reproduce", "--claim", "pro-existence,pro-dpo-identity", "--out", str(tmp_path), "--no-plot"])
    captured = capsys.readouterr()
    assert rc == 1 and "[FAILED]" in captured.out and "not reproduced: pro-existence" in captured.err
    assert not (tmp_path / "reproduce.png").exists() and (tmp_path / "reproduce.json").exists()


def test_bad_arguments_fail_before_running(tmp_path, capsys):
    assert main(["reproduce", "--claim", "nope"]) == 2
    assert "unknown claim 'nope'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["reproduce", "--out", str(blocker / "sub")]) == 2  # a file where the folder should be
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown claim"):
        run_claims(["nope"])
