"""Worker: the vocabulary-parallel head (DTensor and raw shard) and context parallelism, against one process."""

from __future__ import annotations

import sys

from tests.dist_workers.common import expect_error, init, max_abs, rel, report, run_cases

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from fastpref import sequence_logprobs  # noqa: E402
from tests.helpers import make_batch  # noqa: E402

RANK = init()
WORLD = dist.get_world_size()
OPTIONS = dict(logit_scale=1.3, softcap=9.0)
V = 301  # uneven over 2 ranks (151 + 150)


def _weights(out, seed=7):
    """A loss using every output: random weights on the totals and on the token log-probs."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out.response.shape, generator=g), torch.randn(out.prompt.shape, generator=g),
            torch.randn(out.token_logps.shape, generator=g))


def _loss(out, seed=7):
    a, b, c = _weights(out, seed)
    return (a * out.response).sum() + (b * out.prompt).sum() + (c * out.token_logps).sum()


def _reference(h, w, labels, seg, b, backend, **kw):
    """One process, the whole head: outputs and gradients."""
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    out = sequence_logprobs(hh, ww, labels, seg, bias=bb, backend=backend, return_token_logps=True, **OPTIONS, **kw)
    _loss(out).backward()
    return out, hh.grad, ww.grad, None if bb is None else bb.grad


def _compare(out, ref) -> dict:
    return {"response": rel(out.response, ref.response), "prompt": rel(out.prompt, ref.prompt),
            "tokens": rel(out.token_logps, ref.token_logps), "n_response": max_abs(out.n_response, ref.n_response)}


def tp_dtensor(backend):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    h, w, labels, seg, b = make_batch(B=2, T=19, D=24, V=V, bias=True, seed=11)
    ref, dh_ref, dw_ref, db_ref = _reference(h, w, labels, seg, b, backend)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    head = nn.Linear(24, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    parallelize_module(head, mesh, ColwiseParallel())
    assert isinstance(head.weight, DTensor) and head.weight.to_local().shape[0] == (151 if RANK == 0 else 150)
    hidden = h.clone().requires_grad_()
    gather = DTensor.full_tensor

    def forbidden(self, *a, **k):
        raise AssertionError("the vocabulary-parallel head gathered a whole DTensor")

    DTensor.full_tensor = forbidden  # the fused head must never gather the head
    try:
        out = sequence_logprobs(hidden, head.weight, labels, seg, bias=head.bias, backend=backend,
                                return_token_logps=True, **OPTIONS)
        _loss(out).backward()
    finally:
        DTensor.full_tensor = gather
    res = _compare(out, ref)
    res.update(dh=rel(hidden.grad, dh_ref), dw=rel(head.weight.grad.full_tensor(), dw_ref),
               db=rel(head.bias.grad.full_tensor(), db_ref),
               grad_is_dtensor=float(isinstance(head.weight.grad, DTensor)))
    # one optimizer step on the sharded head against the same step on the whole head
    torch.optim.SGD(head.parameters(), lr=0.5).step()
    res["weight_after_step"] = rel(head.weight.full_tensor(), w - 0.5 * dw_ref)
    res["bias_after_step"] = rel(head.bias.full_tensor(), b - 0.5 * db_ref)
    return res


def tp_raw(backend, mean=False):
    h, w, labels, seg, b = make_batch(B=3, T=17, D=20, V=V, bias=True, seed=12)
    kw = {"reduction": "mean"} if mean else {}
    ref, dh_ref, dw_ref, db_ref = _reference(h, w, labels, seg, b, backend, **kw)
    cut = (0, 117, V)  # uneven on purpose
    start, stop = cut[RANK], cut[RANK + 1]
    hidden = h.clone().requires_grad_()
    w_local = w[start:stop].clone().requires_grad_()
    b_local = b[start:stop].clone().requires_grad_()
    out = sequence_logprobs(hidden, w_local, labels, seg, bias=b_local, backend=backend, return_token_logps=True,
                            vocab_parallel_group=dist.group.WORLD, vocab_range=(start, stop), **OPTIONS, **kw)
    _loss(out).backward()
    res = _compare(out, ref)
    res.update(dh=rel(hidden.grad, dh_ref), dw=rel(w_local.grad, dw_ref[start:stop]),
               db=rel(b_local.grad, db_ref[start:stop]))
    with torch.no_grad():  # no gradient: the same collectives, nothing saved
        res["no_grad"] = rel(sequence_logprobs(h, w[start:stop], labels, seg, bias=b[start:stop], backend=backend,
                                               vocab_parallel_group=dist.group.WORLD, vocab_range=(start, stop),
                                               **OPTIONS, **kw).response, ref.response)
    return res


def cp(backend, frozen=False, mean=False):
    h, w, labels, seg, b = make_batch(B=3, T=38, D=20, V=V, bias=not frozen, seed=13)
    kw = {"reduction": "mean"} if mean else {}
    ref, dh_ref, dw_ref, db_ref = _reference(h, w, labels, seg, b, backend, **kw)
    T = h.shape[1] // WORLD
    piece = slice(RANK * T, (RANK + 1) * T)  # this rank's slice of every sequence, along time
    hidden = h[:, piece].clone().requires_grad_()
    weight = w.clone().requires_grad_(not frozen)
    bias = None if b is None else b.clone().requires_grad_()
    out = sequence_logprobs(hidden, weight, labels[:, piece].contiguous(), seg[:, piece].contiguous(), bias=bias,
                            backend=backend, return_token_logps=True, context_parallel_group=dist.group.WORLD,
                            **OPTIONS, **kw)
    a, c, tok = _weights(ref)
    loss = (a * out.response).sum() + (c * out.prompt).sum() + (tok[:, piece] * out.token_logps).sum()
    loss.backward()
    res = {"response": rel(out.response, ref.response), "prompt": rel(out.prompt, ref.prompt),
           "tokens": rel(out.token_logps, ref.token_logps[:, piece]),
           "n_response": max_abs(out.n_response, ref.n_response), "dh": rel(hidden.grad, dh_ref[:, piece])}
    empty_here = int(((seg[:, piece] > 0) & (labels[:, piece] != -100)).sum(dim=1).eq(0).sum())
    res["sequences_with_no_local_token"] = empty_here
    if not frozen:
        res["dw"] = rel(weight.grad, dw_ref)  # summed across the group: every rank holds the whole gradient
        res["db"] = rel(bias.grad, db_ref)
    return res


# ------------------------------------------------------------------------------------ token statistics (return_stats)


def _stats_loss(out, piece=slice(None)):
    """A loss on the log-probs and an entropy term (its gradient joins the head's backward)."""
    g = torch.Generator().manual_seed(21)
    a = torch.randn(out.response.shape, generator=g)
    e = torch.randn(out.stats.tokens.entropy.shape if piece == slice(None) else (3, 38), generator=g)[:, piece]
    return (a * out.response).sum() + 0.3 * (e * out.stats.tokens.entropy).sum()


def _compare_stats(out, ref, piece=slice(None)) -> dict:
    res = {}
    for name in ("entropy", "log_sum_p2", "mean_logit"):
        res[f"token_{name}"] = rel(getattr(out.stats.tokens, name), getattr(ref.stats.tokens, name)[:, piece])
    res["token_argmax_mismatches"] = float((out.stats.tokens.argmax_is_label
                                            != ref.stats.tokens.argmax_is_label[:, piece]).sum())
    res["token_argmax_hits"] = float(out.stats.tokens.argmax_is_label.sum())
    for segment in ("response", "prompt"):
        for name in ("entropy", "log_sum_p2", "mean_logit", "argmax_is_label"):
            res[f"{segment}_{name}"] = rel(getattr(getattr(out.stats, segment), name),
                                          getattr(getattr(ref.stats, segment), name))
    return res


def _stats_batch(seed, B=3, T=38, D=20):
    """A batch whose labels are the argmax at a third of the rows (on both shards), so argmax == label is tested."""
    h, w, labels, seg, b = make_batch(B=B, T=T, D=D, V=V, bias=True, seed=seed)
    z = OPTIONS["softcap"] * torch.tanh(OPTIONS["logit_scale"] * (h @ w.t() + b) / OPTIONS["softcap"])
    pick = (torch.arange(T) % 3 == 0)[None, :] & (labels != -100)
    labels = torch.where(pick, z.argmax(dim=-1), labels)
    return h, w, labels, seg, b


def _stats_reference(h, w, labels, seg, b, backend, **kw):
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    ref = sequence_logprobs(hh, ww, labels, seg, bias=bb, backend=backend, return_stats=True, **OPTIONS, **kw)
    _stats_loss(ref).backward()
    return ref, hh.grad, ww.grad, bb.grad


def tp_stats(backend, raw, mean=False):
    """The token statistics of a vocabulary-parallel head (DTensor or raw shard) against one process; the entropy's
    gradient through the shards' backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    kw = {"reduction": "mean"} if mean else {}
    h, w, labels, seg, b = _stats_batch(seed=31)
    ref, dh_ref, dw_ref, db_ref = _stats_reference(h, w, labels, seg, b, backend, **kw)
    hidden = h.clone().requires_grad_()
    if raw:
        cut = (0, 117, V)
        start, stop = cut[RANK], cut[RANK + 1]
        weight, bias = w[start:stop].clone().requires_grad_(), b[start:stop].clone().requires_grad_()
        kw.update(vocab_parallel_group=dist.group.WORLD, vocab_range=(start, stop))
    else:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        weight = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
        bias = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
    out = sequence_logprobs(hidden, weight, labels, seg, bias=bias, backend=backend, return_stats=True, **OPTIONS,
                            **kw)
    _stats_loss(out).backward()
    res = _compare_stats(out, ref)
    res["response"] = rel(out.response, ref.response)
    dw = weight.grad if raw else weight.grad.full_tensor()
    db = bias.grad if raw else bias.grad.full_tensor()
    shard = slice(*((0, 117, V)[RANK:RANK + 2])) if raw else slice(None)
    res.update(dh=rel(hidden.grad, dh_ref), dw=rel(dw, dw_ref[shard]), db=rel(db, db_ref[shard]))
    return res


def cp_stats(backend):
    """The token statistics with context parallelism: per-segment sums over the group, the entropy's gradient."""
    h, w, labels, seg, b = _stats_batch(seed=33)
    ref, dh_ref, dw_ref, db_ref = _stats_reference(h, w, labels, seg, b, backend)
    T = h.shape[1] // WORLD
    piece = slice(RANK * T, (RANK + 1) * T)
    hidden = h[:, piece].clone().requires_grad_()
    weight, bias = w.clone().requires_grad_(), b.clone().requires_grad_()
    out = sequence_logprobs(hidden, weight, labels[:, piece].contiguous(), seg[:, piece].contiguous(), bias=bias,
                            backend=backend, return_stats=True, context_parallel_group=dist.group.WORLD, **OPTIONS)
    _stats_loss(out, piece).backward()
    res = _compare_stats(out, ref, piece)
    res.update(dh=rel(hidden.grad, dh_ref[:, piece]), dw=rel(weight.grad, dw_ref), db=rel(bias.grad, db_ref))
    return res


# ------------------------------------------------------------------------------------------- errors, on every rank


def agree_on_local_error():
    """Rank 1's own shard is non-finite: rank 1 raises that, rank 0 raises 'another rank' (no hang)."""
    h, w, labels, seg, b = make_batch(B=2, T=9, D=8, V=V, seed=14)
    cut = (0, 150, V)
    w_local = w[cut[RANK]:cut[RANK + 1]].clone()
    if RANK == 1:
        w_local[3, 2] = float("nan")
    return expect_error(lambda: sequence_logprobs(h, w_local, labels, seg, backend="torch",
                                                  vocab_parallel_group=dist.group.WORLD,
                                                  vocab_range=(cut[RANK], cut[RANK + 1])))


def different_batches():
    """A Shard(0) DTensor over ranks that hold different data (FSDP-sharded, not tensor parallel): refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    h, w, labels, seg, _ = make_batch(B=2, T=9, D=8, V=V, seed=15 + RANK)  # each rank its own batch
    mesh = init_device_mesh("cpu", (WORLD,))
    w = distribute_tensor(make_batch(B=2, T=9, D=8, V=V, seed=15)[1], mesh, [Shard(0)])
    return expect_error(lambda: sequence_logprobs(h, w, labels, seg, backend="torch"))


def label_out_of_range():
    h, w, labels, seg, _ = make_batch(B=2, T=9, D=8, V=V, seed=16)
    labels[1, 2], seg[1, 2] = V, 2  # the whole head's V: out of range on every shard
    cut = (0, 150, V)
    return expect_error(lambda: sequence_logprobs(h, w[cut[RANK]:cut[RANK + 1]], labels, seg, backend="torch",
                                                  vocab_parallel_group=dist.group.WORLD,
                                                  vocab_range=(cut[RANK], cut[RANK + 1])))


def ranges_do_not_tile():
    h, w, labels, seg, _ = make_batch(B=2, T=9, D=8, V=V, seed=17)
    start, stop = ((0, 150), (149, V))[RANK]
    return expect_error(lambda: sequence_logprobs(h, w[start:stop], labels, seg, backend="torch",
                                                  vocab_parallel_group=dist.group.WORLD, vocab_range=(start, stop)))


def cp_empty_sequence():
    h, w, labels, seg, _ = make_batch(B=2, T=10, D=8, V=V, seed=18)
    seg[1] = 0  # sequence 1 has no scored token on either rank
    T = 5
    piece = slice(RANK * T, (RANK + 1) * T)
    return expect_error(lambda: sequence_logprobs(h[:, piece], w, labels[:, piece], seg[:, piece], backend="torch",
                                                  context_parallel_group=dist.group.WORLD))


CASES = {}
for _backend in ("torch", "triton"):
    CASES[f"tp_dtensor-{_backend}"] = lambda bk=_backend: tp_dtensor(bk)
    CASES[f"tp_raw-{_backend}"] = lambda bk=_backend: tp_raw(bk)
    CASES[f"cp-{_backend}"] = lambda bk=_backend: cp(bk)
for _backend in ("torch", "triton"):
    CASES[f"tp_stats_dtensor-{_backend}"] = lambda bk=_backend: tp_stats(bk, raw=False)
    CASES[f"tp_stats_raw-{_backend}"] = lambda bk=_backend: tp_stats(bk, raw=True)
    CASES[f"cp_stats-{_backend}"] = lambda bk=_backend: cp_stats(bk)
CASES["tp_stats_raw_mean-torch"] = lambda: tp_stats("torch", raw=True, mean=True)
CASES["tp_raw_mean-torch"] = lambda: tp_raw("torch", mean=True)
CASES["cp_mean-torch"] = lambda: cp("torch", mean=True)
CASES["cp_frozen_head-torch"] = lambda: cp("torch", frozen=True)
CASES["cp_frozen_head-triton"] = lambda: cp("triton", frozen=True)
CASES["agree_on_local_error"] = agree_on_local_error
CASES["different_batches"] = different_batches
CASES["label_out_of_range"] = label_out_of_range
CASES["ranges_do_not_tile"] = ranges_do_not_tile
CASES["cp_empty_sequence"] = cp_empty_sequence

if __name__ == "__main__":
    report(run_cases(CASES, set(sys.argv[1:])))
    dist.barrier()
    dist.destroy_process_group()
