"""README.md is true: every ```python block runs as written, and CI runs exactly its install and test commands."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def _section(title: str) -> str:
    start = TEXT.index(f"\n## {title}\n")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start:end if end >= 0 else None]


def _bash_blocks(section: str) -> list[list[str]]:
    return [[line for line in block.splitlines() if line.strip()]
            for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_examples():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_ci_runs_exactly_the_readme_commands():
    """`.ci/run` = the README's install block (CPU machine) then its test block, character for character."""
    install = next(block for block in _bash_blocks(_section("Install")) if any("pip install -e" in l for l in block))
    (test,) = _bash_blocks(_section("Test"))
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in script if line.strip() and not line.startswith("#")
                and line not in ("set -euo pipefail", 'cd "$(dirname "$0")/.."')]
    assert commands == install + test
    assert test == ["pytest"]
    # the CPU wheel comes before the package, whose `torch>=2.4` would otherwise pull PyPI's CUDA build
    torch_line = next(i for i, l in enumerate(install) if l.startswith("pip install torch"))
    assert "download.pytorch.org/whl/cpu" in install[torch_line]
    assert torch_line < next(i for i, l in enumerate(install) if "pip install -e" in l)


def test_readme_states_python_version_and_clone():
    install = _section("Install")
    assert "Python 3.10" in install and "git clone" in install and "python3 -m venv" in install
    assert "NVIDIA GPU" in install  # what to do on a CUDA machine


def test_plain_pytest_imports_the_repository_packages():
    """The README's `pytest` (the console script, not `python -m pytest`) collects tests that import `benchmarks`."""
    exe = shutil.which("pytest", path=os.path.dirname(sys.executable)) or shutil.which("pytest")
    if exe is None:
        pytest.skip("no pytest console script")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([exe, "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_benchmarks_smoke.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test_head_check_smoke" in proc.stdout


def test_install_hints_name_a_command_that_works_from_a_checkout():
    """fastpref is not on a package index: `pip install fastpref[...]` / `'fastpref[...]'` cannot work."""
    bad = re.compile(r"pip install\s+['\"]?fastpref\b")
    offenders = []
    for path in [*ROOT.glob("fastpref/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("examples/*.py"),
                 *ROOT.glob("benchmarks/*.py"), README, *ROOT.glob("benchmarks/*.md")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if bad.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_readme_links_stay_in_the_repository():
    """A clone carries everything the README points to: no link leaves the repository (`../shared/...`)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", TEXT) + re.findall(r"`(\.\./[^`]+)`", TEXT)
    outside = [t for t in targets if not re.match(r"[a-z]+://", t) and (t.startswith("../") or t.startswith("/"))]
    assert not outside, outside
    assert "METHODS.md" not in TEXT and "docs/methods.md" in TEXT
