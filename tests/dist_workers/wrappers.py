"""Worker: the Hugging Face patch under FSDP2, FSDP1, DDP and a tensor-parallel head, against one process."""

from __future__ import annotations

import functools
import sys

from tests.dist_workers.common import expect_error, init, max_abs, preference_batch, rel, report, run_cases, tiny_llama

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from fastpref.integrations.transformers import patch  # noqa: E402

RANK = init()
WORLD = dist.get_world_size()
CPU = torch.device("cpu")
B, LR = 4, 0.5
COEF = torch.tensor([1.0, -0.7, 0.4, -1.3])


def _inputs(rows=None):
    ids, attn, comp = preference_batch(B=B)
    if rows is not None:
        ids, attn, comp = ids[rows], attn[rows], comp[rows]
    return dict(input_ids=ids, attention_mask=attn, completion_mask=comp, logps_only=True)


def _loss(out, rows):
    return (COEF[rows] * out.logps.response).mean() + 0.3 * (COEF[rows] * out.logps.n_response).mean() * 0


def _model(*, tie=False, lora=False):
    model = tiny_llama(tie=tie)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(3)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, init_lora_weights=False))
    return model


def _reference(tie=False, lora=False, rows=None):
    """One process, the whole batch (or ``rows``): log-probs, loss and every parameter after one SGD step."""
    model = patch(_model(tie=tie, lora=lora), backend="torch")
    rows = slice(None) if rows is None else rows
    out = model(**_inputs(rows))
    loss = _loss(out, rows)
    loss.backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    opt.step()
    params = {_clean(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logps.response.detach(), loss.detach(), params


def _clean(name: str) -> str:
    for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(junk, "")
    return name


def _compare(local_logps, loss, params, ref, rows):
    ref_logps, ref_loss, ref_params = ref
    res = {"logps": rel(local_logps, ref_logps[rows]), "params_compared": len(params)}
    local_loss = loss.detach().clone()
    dist.all_reduce(local_loss)  # the data-parallel loss is the mean of the ranks' losses
    res["loss"] = rel(local_loss / WORLD, ref_loss)
    missing = sorted(set(ref_params) - set(params))
    res["missing_params"] = len(missing)
    res["params"] = max(rel(params[n], ref_params[n]) for n in ref_params if n in params)
    return res


MY_ROWS = slice(RANK * (B // WORLD), (RANK + 1) * (B // WORLD))


def _train_step(model, call_model, read_params):
    out = call_model(**_inputs(MY_ROWS))
    loss = _loss(out, MY_ROWS)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step()
    return out.logps.response.detach(), loss, read_params()


def _fsdp2_params(model):
    from torch.distributed.tensor import DTensor

    return {_clean(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------- FSDP2


def fsdp2(layout, *, tie=False, lora=False, after=False, mixed=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ref = _reference(tie=tie, lora=lora)
    model = _model(tie=tie, lora=lora)
    if not after:
        patch(model, backend="torch")
    mesh = init_device_mesh("cpu", (WORLD,))
    kw = {"mesh": mesh}
    if mixed:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    lm = model.get_base_model() if lora else model
    for layer in lm.model.layers:
        fully_shard(layer, **kw)
    if layout == "head":
        fully_shard(lm.lm_head, **kw)
    elif layout == "norm_head":
        fully_shard([lm.model.norm, lm.lm_head], **kw)
    fully_shard(model, **kw)
    if after:
        patch(model, backend="torch")
    res = _compare(*_train_step(model, model, lambda: _fsdp2_params(model)), ref, MY_ROWS)
    from torch.distributed.fsdp import FSDPModule

    res["head_is_unit"] = float(isinstance(lm.lm_head, FSDPModule))
    return res


# ------------------------------------------------------------------------------------------------- FSDP1


def fsdp1(layout, *, use_orig_params=False, lora=False, after=False, tie=False):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    ref = _reference(lora=lora, tie=tie)
    model = _model(lora=lora, tie=tie)
    if not after:
        patch(model, backend="torch")
    lm = model.get_base_model() if lora else model
    head = lm.lm_head
    units = (lambda m: isinstance(m, LlamaDecoderLayer) or (layout == "head" and m is head))
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=units)
    wrapped = FSDP(model, device_id=CPU, use_orig_params=use_orig_params or lora, auto_wrap_policy=policy)
    if after:
        patch(wrapped, backend="torch")

    def read():
        with FSDP.summon_full_params(wrapped, writeback=False):
            return {_clean(n): p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}

    res = _compare(*_train_step(wrapped, wrapped, read), ref, MY_ROWS)
    res["head_is_unit"] = float(isinstance(lm.lm_head, FSDP))
    return res


# ------------------------------------------------------------------------------------------------- DDP


def ddp():
    """Each rank its own half of the batch: DDP averages the gradients; every rank ends with the same parameters,
    equal to one process on the whole batch (trl#7245: a fused head that bypasses DDP's forward skips this)."""
    ref = _reference()
    model = patch(_model(), backend="torch")
    wrapped = nn.parallel.DistributedDataParallel(model)
    res = _compare(*_train_step(wrapped, wrapped, lambda: {n: p.detach().clone() for n, p in model.named_parameters()}),
                   ref, MY_ROWS)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    other = flat.clone()
    dist.broadcast(other, src=0)
    res["ranks_differ"] = max_abs(flat, other)
    return res


# ------------------------------------------------------------------------------------------------- tensor parallel


def tp_head(after=False):
    """``ColwiseParallel`` on ``lm_head`` (a Shard(0) DTensor head); every rank the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    ref = _reference()
    model = _model()
    if not after:
        patch(model, backend="torch")
    parallelize_module(model, init_device_mesh("cpu", (WORLD,)), {"lm_head": ColwiseParallel()})
    if after:
        patch(model, backend="torch")
    out = model(**_inputs())
    loss = _loss(out, slice(None))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    ref_logps, ref_loss, ref_params = ref
    res = {"logps": rel(out.logps.response, ref_logps), "loss": rel(loss, ref_loss)}
    res["params"] = max(rel(p.full_tensor() if hasattr(p, "full_tensor") else p, ref_params[n])
                        for n, p in model.named_parameters())
    return res


# ------------------------------------------------------------------------------------------------- verification


def wrong_config(wrapper):
    """A config that lies about the head (a softcap the forward does not apply): the check after wrapping runs
    the same on every rank, and every rank raises."""
    model = _model()
    model.config.final_logit_softcapping = 3.0
    if wrapper == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        target = model
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        target = FSDP(model, device_id=CPU)
    return expect_error(lambda: patch(target, backend="torch"))


CASES = {
    "fsdp2_root": lambda: fsdp2("root"),
    "fsdp2_head_unit": lambda: fsdp2("head"),
    "fsdp2_norm_head_unit": lambda: fsdp2("norm_head"),
    "fsdp2_lora_head_unit": lambda: fsdp2("head", lora=True),
    "fsdp2_tied": lambda: fsdp2("root", tie=True),
    "fsdp2_patch_after_wrap_root": lambda: fsdp2("root", after=True),
    "fsdp2_patch_after_wrap_head_unit": lambda: fsdp2("head", after=True),
    "fsdp2_bf16_head_unit": lambda: fsdp2("head", mixed=True),
    "fsdp1_root": lambda: fsdp1("root"),
    "fsdp1_root_orig_params": lambda: fsdp1("root", use_orig_params=True),
    "fsdp1_head_unit": lambda: fsdp1("head"),
    "fsdp1_lora_head_unit": lambda: fsdp1("head", lora=True),
    "fsdp1_tied": lambda: fsdp1("root", tie=True),
    "fsdp1_patch_after_wrap_root": lambda: fsdp1("root", after=True),
    "fsdp1_patch_after_wrap_head_unit": lambda: fsdp1("head", after=True, use_orig_params=True),
    "ddp": ddp,
    "tp_head": tp_head,
    "tp_head_patch_after": lambda: tp_head(after=True),
    "wrong_config_fsdp2": lambda: wrong_config("fsdp2"),
    "wrong_config_fsdp1": lambda: wrong_config("fsdp1"),
}

if __name__ == "__main__":
    report(run_cases(CASES, set(sys.argv[1:])))
    dist.barrier()
    dist.destroy_process_group()
