"""Run a worker script on N local processes (gloo on 127.0.0.1) and collect what each rank reports.

A worker calls :func:`report` with a JSON-able dict; :func:`launch` returns one dict per rank. A hang becomes a
failure: after ``timeout`` seconds every process is killed and :class:`LaunchError` carries the output tail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


class LaunchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: str, *args: str, nproc: int = 2, timeout: float = 240.0, env: dict | None = None) -> list[dict]:
    """Run ``tests/dist_workers/<worker>.py`` on ``nproc`` ranks; returns each rank's reported dict."""
    script = HERE / f"{worker}.py"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fastpref-mp-") as tmp:
        procs, logs = [], []
        for rank in range(nproc):
            penv = dict(os.environ)
            penv.update({
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                "FASTPREF_REPORT": os.path.join(tmp, f"rank{rank}.json"), "PYTHONPATH": str(REPO),
                "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                "GLOO_SOCKET_IFNAME": penv.get("GLOO_SOCKET_IFNAME", "lo"),
            })
            if env:
                penv.update(env)
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(script), *args], env=penv, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True))
        deadline = time.monotonic() + timeout
        timed_out = False
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                break
            if any(p.poll() not in (None, 0) for p in procs):  # one rank died: give the others a moment, then stop
                deadline = min(deadline, time.monotonic() + 20)
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
        codes = [p.returncode for p in procs]
        if timed_out or any(codes):
            tails = "\n".join(f"--- rank {r} (exit {c}) ---\n{out[-6000:]}"
                              for r, (c, out) in enumerate(zip(codes, outputs)))
            why = f"timed out after {timeout:.0f}s (a hang)" if timed_out else f"exit codes {codes}"
            raise LaunchError(f"{worker}: {why}\n{tails}")
        results = []
        for rank in range(nproc):
            path = os.path.join(tmp, f"rank{rank}.json")
            if not os.path.exists(path):
                raise LaunchError(f"{worker}: rank {rank} reported nothing\n{outputs[rank][-6000:]}")
            with open(path) as f:
                results.append(json.load(f))
        return results


def report(results: dict) -> None:
    """Called by a worker: write this rank's results for :func:`launch`."""
    with open(os.environ["FASTPREF_REPORT"], "w") as f:
        json.dump(results, f)
