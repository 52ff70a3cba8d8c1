"""Every Triton kernel variant compiles for sm_90 (Hopper) with its production tiles, no GPU needed.

The CPU tests run the kernels through Triton's interpreter, which accepts code the real compiler rejects (and
the reverse); this compiles every variant the launchers can pick with Triton's own ptxas for the H100/H200
target, specialized as the JIT specializes a launch (aligned pointers, integers divisible by 16), and checks that
none spills registers: neither ``STACK`` nor ``LOCAL`` bytes. Runs in a subprocess: the test session has TRITON_INTERPRET=1 set.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("compile_sm90.py")


def _compiler_available() -> bool:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _compiler_available(), reason="triton's CUDA compiler (ptxas, ASTSource) is not installed")
@pytest.mark.parametrize("group", ["head", "loss"])
def test_kernels_compile_for_sm90(group):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), group], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert rows, "the compile script reported no kernel"
    assert all(r.get("stack_bytes") is not None for r in rows), "cuobjdump reported no STACK figure"
    spilled = [f"{r['kernel']} (stack {r['stack_bytes']} B, local {r['local_bytes']} B)" for r in rows
               if r.get("stack_bytes") or r.get("local_bytes")]
    assert not spilled, f"variants spilling registers: {spilled}"
