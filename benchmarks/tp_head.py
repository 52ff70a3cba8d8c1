"""The vocabulary-parallel head against the single-GPU head: one DPO step of the head, time, memory, exactness.

Each rank holds ``V / N`` rows of the head (``torch.chunk`` split, as ``ColwiseParallel`` shards ``lm_head``) and the
same hidden states; :func:`fastpref.sequence_logprobs` with ``vocab_parallel_group`` / ``vocab_range`` (``tp-raw``)
or with the head as a ``Shard(0)`` DTensor (``tp-dtensor``) gives every rank the whole head's log-probs. Measured
with the anchors' protocol (``common.bench``: two warm-up steps, median of CUDA-event timings, peak memory above
what is allocated after warm-up) on every rank, reported as the slowest rank's median and the largest peak:

- ``single``: the whole head on one GPU (each rank runs it on its own GPU, independently: no communication);
- ``tp-raw`` / ``tp-dtensor``: the head over all ranks. Expected: about ``1/N`` of the head's FLOPs per rank, plus
  two all-reduces of ``[M]`` floats in each forward and one of the scored rows' ``dH`` (``[M, D]``, the hidden
  states' dtype) in the backward; memory: ``1/N`` of the head and its gradient, the same ``O(M D)`` activations.

Exactness, against ``single`` on the same inputs: the DPO loss, ``dH`` and each rank's rows of ``dW``.

    torchrun --nproc-per-node 8 -m benchmarks.tp_head --out benchmarks/results/DATE-tp     # a multi-GPU node
    python -m benchmarks.tp_head --smoke --out /tmp/tp        # CI: 2 CPU processes (gloo), tiny shapes
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

import fastpref

from .common import add_shape_args, bench, dpo_from_logps, make_inputs, markdown_table, versions, write_results


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap)
    ap.add_argument("--smoke-procs", type=int, default=2, help="processes of a --smoke run launched without torchrun")
    ap.add_argument("--timeout-s", type=float, default=600, help="a --smoke run that takes longer fails")
    return ap.parse_args(argv)


def _segments(lab, prompt_frac):
    seg = torch.full_like(lab, 2)
    seg[:, : int(lab.shape[1] * prompt_frac)] = 1
    return seg


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _measure(a, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    W, H, Href, lab = make_inputs(a.pairs, a.T, a.D, a.V, a.prompt_frac, device)
    seg = _segments(lab, a.prompt_frac)
    kw = dict(backend=a.backend, validate=False)

    def run(logps, weight, hidden):
        def step():
            with torch.no_grad():
                ref = logps(Href, weight)
            pol = logps(hidden, weight)
            loss = dpo_from_logps(pol, ref)
            loss.backward()
            return loss, {}
        return step

    rows = []
    # the whole head on this rank's GPU: the baseline, and the gradients every TP rank is compared with
    Wf, Hf = W.clone().requires_grad_(), H.clone().requires_grad_()
    single = run(lambda h, w: fastpref.sequence_logprobs(h, w, lab, seg, **kw).response, Wf, Hf)
    rows.append(bench("single", single, [Wf, Hf], device, a.iters) | {"world": 1})
    Wf.grad = Hf.grad = None
    ref_loss, _ = single()
    ref_dh = Hf.grad.detach().clone()
    chunk = -(-a.V // world)
    start, stop = min(rank * chunk, a.V), min((rank + 1) * chunk, a.V)
    ref_dw = Wf.grad[start:stop].detach().clone()
    del Wf, Hf, single

    def tp(name, weight):
        hidden = H.clone().requires_grad_()
        if name == "tp-raw":
            logps = lambda h, w: fastpref.sequence_logprobs(  # noqa: E731
                h, w, lab, seg, vocab_parallel_group=group, vocab_range=(start, stop), **kw).response
        else:
            logps = lambda h, w: fastpref.sequence_logprobs(h, w, lab, seg, **kw).response  # noqa: E731
        step = run(logps, weight, hidden)
        row = bench(name, step, [weight, hidden], device, a.iters) | {"world": world}
        weight.grad = hidden.grad = None
        loss, _ = step()
        grad_w = weight.grad.to_local() if hasattr(weight.grad, "to_local") else weight.grad
        row.update(loss_rel_err=abs(float(loss.detach()) - float(ref_loss.detach())) / abs(float(ref_loss.detach())),
                   dh_rel_err=_rel(hidden.grad, ref_dh), dw_rel_err=_rel(grad_w, ref_dw))
        return row

    rows.append(tp("tp-raw", W[start:stop].clone().requires_grad_()))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(device.type, (world,))
    rows.append(tp("tp-dtensor", distribute_tensor(W, mesh, [Shard(0)]).detach().requires_grad_()))
    # the slowest rank's times, the largest peak and error
    for row in rows:
        for key in [k for k, v in row.items() if isinstance(v, float)]:
            value = torch.tensor([row[key]], dtype=torch.float64, device=device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            row[key] = float(value)
    return rows


def _run(a) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        rows = _measure(a, device)
        if dist.get_rank() == 0:
            M = int((_segments(torch.zeros(1, a.T, dtype=torch.long), a.prompt_frac) > 0).sum()) * 2 * a.pairs
            meta = versions() | {"world": dist.get_world_size(), "pairs": a.pairs, "T": a.T, "D": a.D, "V": a.V,
                                 "prompt_frac": a.prompt_frac, "backend": a.backend, "scored_rows": M,
                                 "backward_allreduce_mib": M * a.D * 2 / 2**20}
            cols = [("impl", "impl", ""), ("world", "ranks", "d"), ("median_ms", "median ms (slowest rank)", ".2f"),
                    ("peak_extra_gib", "peak extra GiB (largest)", ".3f"), ("loss_rel_err", "loss rel. err", ".2e"),
                    ("dh_rel_err", "dH rel. err", ".2e"), ("dw_rel_err", "dW rel. err (own rows)", ".2e")]
            table = (f"# Vocabulary-parallel head vs one GPU ({meta['device']}, {meta['world']} ranks)\n\n"
                     f"DPO step of the head: pairs {a.pairs} x T {a.T}, D {a.D}, V {a.V}, prompt {a.prompt_frac}, "
                     f"backend {a.backend}; {meta['date']}\n\n" + markdown_table(rows, cols))
            write_results(a.out, "tp_head", meta, rows, table)
            print(table)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, a, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(a.smoke_procs), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _run(a)


def main(argv=None) -> int:
    a = _parse(argv)
    if a.smoke:
        a.pairs, a.T, a.D, a.V, a.iters = 2, 24, 40, 301, min(a.iters, 2)
    elif not torch.cuda.is_available():
        raise SystemExit("tp_head: no CUDA device; run with --smoke on a CPU")
    if "RANK" in os.environ:  # launched by torchrun
        _run(a)
        return 0
    if not a.smoke:
        raise SystemExit("tp_head: launch it with torchrun --nproc-per-node N -m benchmarks.tp_head ...")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.spawn(_spawned, args=(a, port), nprocs=a.smoke_procs, join=False)
    deadline = time.monotonic() + a.timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise SystemExit(f"tp_head: the smoke run did not finish in {a.timeout_s:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
