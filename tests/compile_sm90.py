"""Compile every fastpref Triton kernel variant the launchers can pick for sm_90 (Hopper), without a GPU.

Run by ``tests/test_kernels_compile.py`` in a subprocess (the test session runs Triton's interpreter, under which
kernels cannot be compiled). Each variant is specialized as the JIT specializes it at launch: every pointer
16-byte aligned and every integer argument that is a multiple of 16 at the Llama-3-8B shapes marked divisible by
16 (``tt.divisibility``), so the compiled code is the one a launch at those shapes runs. Prints one JSON line per
variant: name, registers, stack (spill) bytes, local bytes, shared memory. Exit status 0 when every variant
compiled; a compile error propagates with its traceback.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastpref.kernels import config  # noqa: E402
from fastpref.kernels import head_null_penalty as HN  # noqa: E402
from fastpref.kernels import logits_grad as LG_  # noqa: E402
from fastpref.kernels import loss_grouped as LG  # noqa: E402
from fastpref.kernels import loss_pairwise as LP  # noqa: E402
from fastpref.kernels import matmul_accumulate as MM  # noqa: E402
from fastpref.kernels import softmax_numerator as SN  # noqa: E402
from fastpref.kernels import target_logit as TL  # noqa: E402
from fastpref.kernels import vocab_logsumexp as VL  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# integer arguments at the Llama-3-8B head (D 4096, V 128256, M 8192, row chunk 2048, vocabulary chunk 2048)
SHAPE_INTS = {"M": 8192, "V": 128256, "D": 4096, "stride_h": 4096, "stride_w": 4096, "stride_g": 4096,
              "stride_dz": 2048, "stride_p": 2048, "vc": 2048, "v_begin": 4096, "cols_per_split": 64128,
              "num_splits": 2, "N": 8192, "P": 4096, "K": 2048,
              "stride_am": 1, "stride_ak": 2048, "stride_bk": 4096, "stride_bn": 1, "stride_cm": 4096, "stride_cn": 1}


def _attrs(fn, signature):
    """``tt.divisibility`` 16 for aligned pointers and for the integer arguments divisible by 16 (as the JIT)."""
    attrs = {}
    for name, ty in signature.items():
        i = fn.arg_names.index(name)
        if ty.startswith("*") or (ty.startswith("i") and SHAPE_INTS.get(name, 1) % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


JOBS: list = []


def compile_one(name, fn, pointers, scalars, constexprs, num_warps=4, num_stages=2, target=None):
    """Queue one variant (compiled in parallel by :func:`run_jobs`)."""
    JOBS.append((name, fn.fn.__module__, fn.fn.__name__, dict(pointers), dict(scalars), dict(constexprs), num_warps,
                 num_stages, (target or TARGET).arch))


def _compile_job(job) -> dict:
    import importlib

    name, module, attr, pointers, scalars, constexprs, num_warps, num_stages, arch = job
    fn = getattr(importlib.import_module(module), attr)
    sig = dict(pointers)
    sig.update(scalars)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=_attrs(fn, {**pointers, **scalars}))
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    row = {"kernel": name, "shared": getattr(getattr(kernel, "metadata", None), "shared", None)}
    row.update(resource_usage(kernel.asm.get("cubin")))
    return row


def run_jobs() -> None:
    """Compile every queued variant on all cores; one JSON line each (a compile error propagates)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for row in pool.map(_compile_job, JOBS):
            print(json.dumps(row), flush=True)


def resource_usage(cubin) -> dict:
    """Registers, stack (register spills and call frames) and local memory per thread, from the cubin by Triton's
    bundled cuobjdump. Spills show as STACK (and sometimes LOCAL): both must be 0."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", text)}
    return {"registers": found.get("REG"), "stack_bytes": found.get("STACK"), "local_bytes": found.get("LOCAL")}


def _tile(cfg):
    return {"BLOCK_M": cfg.block_m, "BLOCK_V": cfg.block_v, "BLOCK_D": cfg.block_d}


def head_kernels():
    for dtype, t in DTYPES.items():
        kind = "fp32" if t == "fp32" else "low_precision"
        prec = config.dot_precision(dtype)
        for bias, cap in ((False, False), (True, True)):
            common = {"HAS_BIAS": bias, "HAS_SOFTCAP": cap}
            for stats, cfg in [(st, c) for st in (False, True)
                               for c in (config.STATS_FORWARD_CANDIDATES if st else config.FORWARD_CANDIDATES)[kind]]:
                if True:
                    compile_one(f"vocab_logsumexp {t} bias={bias} softcap={cap} stats={stats} "
                                f"{cfg.block_m}x{cfg.block_v}x{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages}",
                                VL._vocab_logsumexp_kernel,
                                {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "ROWS": "*i64", "LABELS": "*i64",
                                 **{n: "*fp32" for n in ("MAX_PART", "SUM_PART", "T1_PART", "T2_PART", "ZSUM_PART",
                                                         "BEFORE_PART", "LABEL_PART")}},
                                {"M": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
                                 "cols_per_split": "i32", "num_splits": "i32", "scale": "fp32", "softcap": "fp32"},
                                {**common, "UPCAST": False, "DOT_PRECISION": prec, "STATS": stats,
                                 "GROUP_M": cfg.group_m, **_tile(cfg)},
                                cfg.num_warps, cfg.num_stages)
            for heavy, cfg in [(h, c) for h in (False, True)
                               for c in (config.STATS_GRAD_TILE_CANDIDATES if h else config.GRAD_TILE_CANDIDATES)[kind]]:
                tag = f"{cfg.block_m}x{cfg.block_v}x{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages}"
                for db in ((False, True) if bias else (False,)):
                    for entropy in ((True,) if heavy else (False,)):
                        compile_one(f"logits_grad {t} bias={bias} softcap={cap} db={db} entropy={entropy} {tag}",
                                    LG_._logits_grad_kernel,
                                    {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "ROWS": "*i64", "LABELS": "*i64",
                                     **{n: "*fp32" for n in ("MAXS", "LOGSUMS", "LPS", "GRAD", "COEF_A", "COEF_B",
                                                             "MEAN_SHIFT")}, "DZ": f"*{t}", "DB_PART": "*fp32"},
                                    {"M": "i32", "v_begin": "i32", "vc": "i32", "D": "i32", "stride_h": "i32",
                                     "stride_w": "i32", "stride_dz": "i32", "scale": "fp32", "softcap": "fp32",
                                     "dz_scale": "fp32"},
                                    {**common, "COMPUTE_DB": db, "ENTROPY": entropy, "UPCAST": False,
                                     "DOT_PRECISION": prec, **_tile(cfg)},
                                    cfg.num_warps, cfg.num_stages)
                if t != "fp16":  # the frozen-head path runs for bf16 and fp32 heads only
                    for stats in ((True,) if heavy else (False,)):
                        compile_one(f"softmax_numerator {t} bias={bias} softcap={cap} stats={stats} {tag}",
                                    SN._softmax_numerator_kernel,
                                    {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "ROWS": "*i64", "LABELS": "*i64",
                                     "REF": "*fp32", "P": f"*{t}",
                                     **{n: "*fp32" for n in ("MAX_PART", "SUM_PART", "T1_PART", "T2_PART", "ZSUM_PART",
                                                             "BEFORE_PART", "LABEL_PART")}},
                                    {"M": "i32", "v_begin": "i32", "vc": "i32", "D": "i32", "stride_h": "i32",
                                     "stride_w": "i32", "stride_p": "i32", "scale": "fp32", "softcap": "fp32",
                                     "clamp": "fp32"},
                                    {**common, "UPCAST": False, "DOT_PRECISION": prec, "STATS": stats, **_tile(cfg)},
                                    cfg.num_warps, cfg.num_stages)
            cfg = config.NULL_PASS_CANDIDATES[kind][0]
            g_prec = prec if t == "bf16" else "tf32" if t == "fp16" else "ieee"
            compile_one(f"head_null {t} bias={bias} softcap={cap}", HN._head_null_rows_kernel,
                        {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "G": f"*{'bf16' if t == 'bf16' else 'fp32'}",
                         "GB": "*fp32", "ROWS": "*i64", "LABELS": "*i64", "MAXS": "*fp32", "LOGSUMS": "*fp32",
                         "LPS": "*fp32", "OUT_PART": "*fp32"},
                        {"M": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32", "stride_g": "i32",
                         "cols_per_split": "i32", "scale": "fp32", "softcap": "fp32"},
                        {**common, "HAS_G_BIAS": bias, "UPCAST": False, "DOT_PRECISION": prec,
                         "G_UPCAST": t == "fp16", "G_DOT_PRECISION": g_prec, **_tile(cfg)},
                        cfg.num_warps, cfg.num_stages)
            tcfg = config.TARGET_TILE
            compile_one(f"target_logit {t} bias={bias} softcap={cap}", TL._target_logit_kernel,
                        {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "ROWS": "*i64", "LABELS": "*i64", "OUT": "*fp32"},
                        {"M": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32", "scale": "fp32",
                         "softcap": "fp32"},
                        {**common, "BLOCK_M": tcfg.block_m, "BLOCK_D": tcfg.block_d}, tcfg.num_warps, tcfg.num_stages)
        if t != "fp32":
            for beta_zero in (False, True):
                compile_one(f"matmul_accumulate {t} beta_zero={beta_zero}", MM._matmul_accumulate_kernel,
                            {"A": f"*{t}", "B": f"*{t}", "C": "*fp32"},
                            {"M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_ak": "i32",
                             "stride_bk": "i32", "stride_bn": "i32", "stride_cm": "i32", "stride_cn": "i32",
                             "alpha": "fp32"},
                            {"BETA_ZERO": beta_zero, "UPCAST": False, "DOT_PRECISION": prec, "GROUP_M": 8,
                             "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3)


def ampere_kernels():
    """The plain forward and gradient tiles the launchers pick on an A100 (sm_80), compiled for sm_80."""
    target = GPUTarget("cuda", 80, 32)
    for dtype in (torch.bfloat16, torch.float16):
        t = DTYPES[dtype]
        for bias, cap in ((False, False), (True, True)):
            common = {"HAS_BIAS": bias, "HAS_SOFTCAP": cap, "UPCAST": False, "DOT_PRECISION": "tf32"}
            for cfg in config.AMPERE_CANDIDATES["forward"]["low_precision"]:
                compile_one(f"sm80 vocab_logsumexp {t} bias={bias} softcap={cap} {cfg.block_m}x{cfg.block_v}x"
                            f"{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages}", VL._vocab_logsumexp_kernel,
                            {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "ROWS": "*i64", "LABELS": "*i64",
                             **{n: "*fp32" for n in ("MAX_PART", "SUM_PART", "T1_PART", "T2_PART", "ZSUM_PART",
                                                     "BEFORE_PART", "LABEL_PART")}},
                            {"M": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
                             "cols_per_split": "i32", "num_splits": "i32", "scale": "fp32", "softcap": "fp32"},
                            {**common, "STATS": False, "GROUP_M": cfg.group_m, **_tile(cfg)},
                            cfg.num_warps, cfg.num_stages, target)
            for cfg in config.AMPERE_CANDIDATES["grad"]["low_precision"]:
                compile_one(f"sm80 logits_grad {t} bias={bias} softcap={cap}", LG_._logits_grad_kernel,
                            {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "ROWS": "*i64", "LABELS": "*i64",
                             **{n: "*fp32" for n in ("MAXS", "LOGSUMS", "LPS", "GRAD", "COEF_A", "COEF_B",
                                                     "MEAN_SHIFT")}, "DZ": f"*{t}", "DB_PART": "*fp32"},
                            {"M": "i32", "v_begin": "i32", "vc": "i32", "D": "i32", "stride_h": "i32",
                             "stride_w": "i32", "stride_dz": "i32", "scale": "fp32", "softcap": "fp32",
                             "dz_scale": "fp32"},
                            {**common, "COMPUTE_DB": bias, "ENTROPY": False, **_tile(cfg)},
                            cfg.num_warps, cfg.num_stages, target)


def pro_scalar_tiles():
    """Every ``(BLOCK_K, BLOCK_J)`` ``loss_grouped.pro_scalar_loss`` can pick (groups of 2 .. MAX_GROUP rows)."""
    return sorted({LG.group_tile(k) for k in range(2, LG.MAX_GROUP + 1)})


def loss_kernels():
    pointers = {n: "*fp32" for n in ("C", "L", "RC", "RL", "NW", "NL", "X1", "X2", "X3", "X4", "WT", "OUT")}
    scalars = {"P": "i32", "beta": "fp32", "k0": "fp32", "k1": "fp32", "k2": "fp32", "scale": "fp32"}
    for name, code in LP.LOSS_CODES.items():
        for exact in ((True, False) if name.startswith("pro") else (True,)):
            compile_one(f"loss_pairwise {name} exact={exact}", LP._pairwise_loss_kernel, pointers, scalars,
                        {"LOSS": code, "EXACT": exact, "HAS_WEIGHT": True, "NOUT": LP.NUM_OUTPUTS[name], "BLOCK": 256})
    for block_k, block_j in pro_scalar_tiles():
        for exact in (True, False):
            compile_one(f"loss_grouped pro_scalar exact={exact} K{block_k}xJ{block_j}", LG._pro_scalar_kernel,
                        {"LP": "*fp32", "REF": "*fp32", "R": "*fp32", "ROWS": "*i64", "STARTS": "*i32",
                         "COUNTS": "*i32", "ETA": "*fp32", "ALPHA": "*fp32", "OUT_GROUP": "*fp32", "OUT": "*fp32"},
                        {"N": "i32", "beta": "fp32", "tau": "fp32", "scale": "fp32"},
                        {"EXACT": exact, "BLOCK_K": block_k, "BLOCK_J": block_j},
                        4)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("all", "head"):
        head_kernels()
        ampere_kernels()
    if which in ("all", "loss"):
        loss_kernels()
    run_jobs()
