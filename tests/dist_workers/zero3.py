"""Worker: the Hugging Face patch under DeepSpeed ZeRO-3 (CPU, gloo), against one process.

``stage3_param_persistence_threshold: 0`` partitions every parameter, however small: with DeepSpeed's default
(1e5 elements) every parameter of a tiny model stays whole on every rank and nothing about ZeRO-3 is tested.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.dist_workers.common import expect_error, preference_batch, rel, report, run_cases, tiny_llama  # noqa: E402

import deepspeed  # noqa: E402
import deepspeed.comm.torch  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fastpref.integrations.transformers import patch  # noqa: E402

# DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (C++, ~2.5 min on the 2-core CI machine) at
# init; gloo's collectives do the same job here, and that kernel is not what these tests are about.
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # (`deepspeed.comm.torch` is torch itself)
deepspeed.init_distributed(dist_backend="gloo")
RANK, WORLD = dist.get_rank(), dist.get_world_size()
B, LR, STEPS = 4, 0.5, 2
COEF = torch.tensor([1.0, -0.7, 0.4, -1.3])
MY_ROWS = slice(RANK * (B // WORLD), (RANK + 1) * (B // WORLD))
CONFIG = {
    "train_micro_batch_size_per_gpu": B // WORLD,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
                          "stage3_prefetch_bucket_size": 0},
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default; the one-process reference does not clip
}


def _inputs(rows):
    ids, attn, comp = preference_batch(B=B)
    return dict(input_ids=ids[rows], attention_mask=attn[rows], completion_mask=comp[rows], logps_only=True)


def _loss(out, rows):
    return (COEF[rows] * out.logps.response).mean()


def _reference(tie):
    """One process, the whole batch, two SGD steps (the second sees whatever the first left gathered)."""
    model = patch(tiny_llama(tie=tie), backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        out = model(**_inputs(slice(None)))
        loss = _loss(out, slice(None))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return out.logps.response.detach(), loss.detach(), {n: p.detach().clone() for n, p in model.named_parameters()}


def zero3(*, tie=False, after=False):
    ref_logps, ref_loss, ref_params = _reference(tie)
    model = tiny_llama(tie=tie)
    if not after:
        patch(model, backend="torch")
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=CONFIG)
    head = model.lm_head.weight
    partitioned = float(head.ds_status.name == "NOT_AVAILABLE" and head.numel() == 0)
    if after:
        patch(engine, backend="torch")
    for _ in range(STEPS):
        out = engine(**_inputs(MY_ROWS))
        loss = _loss(out, MY_ROWS)
        engine.backward(loss)
        engine.step()
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        got = {n: p.detach().clone() for n, p in model.named_parameters()}
    total = loss.detach().clone()
    dist.all_reduce(total)
    return {"logps": rel(out.logps.response, ref_logps[MY_ROWS]), "loss": rel(total / WORLD, ref_loss),
            "params": max(rel(got[n], ref_params[n]) for n in ref_params), "head_partitioned": partitioned,
            "params_compared": len([n for n in ref_params if n in got])}


def wrong_config():
    model = tiny_llama()
    model.config.final_logit_softcapping = 3.0
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=CONFIG)
    return expect_error(lambda: patch(engine, backend="torch"))


CASES = {
    "zero3": zero3,
    "zero3_tied": lambda: zero3(tie=True),
    "zero3_patch_after_wrap": lambda: zero3(after=True),
    "zero3_wrong_config": wrong_config,
}

if __name__ == "__main__":
    report(run_cases(CASES, set(sys.argv[1:])))
    dist.barrier()
