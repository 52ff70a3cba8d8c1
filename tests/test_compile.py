"""``torch.compile(fullgraph=True)`` of a training step through the fused head and the fused loss heads (issue 12
item 5): no graph break, no recompile across sequence lengths (``dynamic=True``), the same numbers as eager.

The head and the loss heads are ``torch.library`` custom ops (``torch.ops.fastpref.*``) with fake implementations
and registered autograd; the data-dependent compaction of the scored rows happens inside them.
"""

import pytest
import torch
import torch._dynamo

import fastpref
from fastpref.losses import functional as F


def _batch(T, D=16, V=53, seed=0):
    g = torch.Generator().manual_seed(seed + T)
    H = torch.randn(4, T, D, generator=g)
    Href = H + 0.1 * torch.randn(4, T, D, generator=g)
    labels = torch.randint(0, V, (4, T), generator=g)
    labels[:, -1] = -100
    seg = torch.full((4, T), 2)
    seg[:, :2] = 1
    return H, Href, labels, seg


def _step(W, backend, entropy_coef):
    def step(H, Href, labels, seg):
        pol = fastpref.sequence_logprobs(H, W, labels, seg, backend=backend, return_stats=True)
        with torch.no_grad():
            ref = fastpref.sequence_logprobs(Href, W, labels, seg, backend=backend)
        c, r = pol.response.chunk(2)
        rc, rr = ref.response.chunk(2)
        loss, _ = F.dpo_loss(c, r, rc, rr, beta=0.1, backend=backend)
        mean_entropy = pol.stats.response.entropy.sum() / pol.n_response.sum()
        return loss - entropy_coef * mean_entropy

    return step


@pytest.mark.parametrize("backend,frozen", [("torch", False), ("torch", True), ("triton", False)])
def test_compiled_training_step_has_one_graph_for_every_length(backend, frozen):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    W = (torch.randn(53, 16, generator=torch.Generator().manual_seed(1)) * 0.3).requires_grad_(not frozen)
    step = _step(W, backend, entropy_coef=0.01)
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for T in (7, 9, 13):
        H, Href, labels, seg = _batch(T)
        results = []
        for fn in (compiled, step):
            h = H.clone().requires_grad_()
            W.grad = None
            loss = fn(h, Href, labels, seg)
            loss.backward()
            results.append((loss.detach(), h.grad, None if frozen else W.grad.clone()))
        (l1, gh1, gw1), (l2, gh2, gw2) = results
        torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gh1, gh2, rtol=1e-5, atol=1e-7)
        if not frozen:
            torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-7)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


def test_compiled_step_still_checks_its_input():
    """The data-dependent checks run inside the op, so a compiled call rejects a bad label as eager does."""
    torch._dynamo.reset()
    W = torch.randn(53, 16)
    fn = torch.compile(lambda H, y: fastpref.sequence_logprobs(H, W, y, backend="torch").response, fullgraph=True)
    H, _, labels, _ = _batch(7)
    labels[0, 0] = 53
    with pytest.raises(ValueError, match="labels"):
        fn(H, labels)
