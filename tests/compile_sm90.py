"""Compile every fastpref Triton kernel variant for sm_90 (Hopper) without a GPU, with the production tiles.

Run by ``tests/test_kernels_compile.py`` in a subprocess (the test session runs Triton's interpreter, under which
kernels cannot be compiled). Prints one JSON line per variant: name, registers, spilled bytes, shared memory.
Exit status 0 when every variant compiled; a compile error propagates with its traceback.
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
from fastpref.kernels import linear_logprob_backward as BW  # noqa: E402
from fastpref.kernels import linear_logprob_forward as FW  # noqa: E402
from fastpref.kernels import loss_grouped as LG  # noqa: E402
from fastpref.kernels import loss_pairwise as LP  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_one(name, fn, pointers, scalars, constexprs, num_warps=4, num_stages=2):
    sig = dict(pointers)
    sig.update(scalars)
    sig.update({k: "constexpr" for k in constexprs})
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    row = {"kernel": name, "shared": getattr(getattr(kernel, "metadata", None), "shared", None)}
    row.update(resource_usage(kernel.asm.get("cubin")))
    print(json.dumps(row), flush=True)


def resource_usage(cubin) -> dict:
    """Registers and local memory (spills) per thread, read from the cubin by Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {k: int(v) for k, v in re.findall(r"(REG|LOCAL):(\d+)", text)}
    return {"registers": found.get("REG"), "local_bytes": found.get("LOCAL")}


def head_kernels():
    for dtype, t in DTYPES.items():
        fcfg, bcfg = config._FORWARD_FP32 if t == "fp32" else config._FORWARD_LOW_PRECISION, \
            config._BACKWARD_FP32 if t == "fp32" else config._BACKWARD_LOW_PRECISION
        prec = config.dot_precision(dtype)
        for bias, cap in ((False, False), (True, True)):
            compile_one(f"forward {t} bias={bias} softcap={cap}", FW._linear_logprob_forward_kernel,
                        {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "ROWS": "*i64", "LABELS": "*i64",
                         "LSE_PART": "*fp32", "TGT_PART": "*fp32"},
                        {"M": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
                         "cols_per_split": "i32", "scale": "fp32", "softcap": "fp32"},
                        {"HAS_BIAS": bias, "HAS_SOFTCAP": cap, "UPCAST": False, "DOT_PRECISION": prec,
                         "BLOCK_M": fcfg.block_m, "BLOCK_V": fcfg.block_v, "BLOCK_D": fcfg.block_d},
                        fcfg.num_warps, fcfg.num_stages)
            for dh, dw in ((True, True), (True, False)):
                compile_one(f"backward {t} bias={bias} softcap={cap} dH={dh} dW={dw}",
                            BW._linear_logprob_backward_kernel,
                            {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "ROWS": "*i64", "LABELS": "*i64",
                             "LSE": "*fp32", "GRAD": "*fp32", "DH": "*fp32", "DW": "*fp32", "DB": "*fp32"},
                            {"M": "i32", "v_begin": "i32", "v_end": "i32", "D": "i32", "stride_h": "i32",
                             "stride_w": "i32", "stride_dh": "i32", "stride_dw": "i32", "scale": "fp32",
                             "softcap": "fp32"},
                            {"HAS_BIAS": bias, "HAS_SOFTCAP": cap, "COMPUTE_DH": dh, "COMPUTE_DW": dw,
                             "COMPUTE_DB": bias and dw, "UPCAST": False, "DOT_PRECISION": prec,
                             "BLOCK_M": bcfg.block_m, "BLOCK_V": bcfg.block_v, "BLOCK_D": bcfg.block_d},
                            bcfg.num_warps, bcfg.num_stages)
            g_prec = prec if t == "bf16" else "tf32" if t == "fp16" else "ieee"
            compile_one(f"head_null {t} bias={bias} softcap={cap}", HN._head_null_rows_kernel,
                        {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "G": f"*{'bf16' if t == 'bf16' else 'fp32'}",
                         "GB": "*fp32", "ROWS": "*i64", "LABELS": "*i64", "LSE": "*fp32", "OUT_PART": "*fp32"},
                        {"M": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32", "stride_g": "i32",
                         "cols_per_split": "i32", "scale": "fp32", "softcap": "fp32"},
                        {"HAS_BIAS": bias, "HAS_G_BIAS": bias, "HAS_SOFTCAP": cap, "UPCAST": False,
                         "DOT_PRECISION": prec, "G_UPCAST": t == "fp16", "G_DOT_PRECISION": g_prec,
                         "BLOCK_M": bcfg.block_m, "BLOCK_V": bcfg.block_v, "BLOCK_D": bcfg.block_d},
                        bcfg.num_warps, bcfg.num_stages)


def loss_kernels():
    pointers = {n: "*fp32" for n in ("C", "L", "RC", "RL", "NW", "NL", "X1", "X2", "X3", "X4", "WT", "OUT")}
    scalars = {"P": "i32", "beta": "fp32", "k0": "fp32", "k1": "fp32", "k2": "fp32", "scale": "fp32"}
    for name, code in LP.LOSS_CODES.items():
        for exact in ((True, False) if name.startswith("pro") else (True,)):
            compile_one(f"loss_pairwise {name} exact={exact}", LP._pairwise_loss_kernel, pointers, scalars,
                        {"LOSS": code, "EXACT": exact, "HAS_WEIGHT": True, "NOUT": LP.NUM_OUTPUTS[name], "BLOCK": 256})
    for exact in (True, False):
        compile_one(f"loss_grouped pro_scalar exact={exact}", LG._pro_scalar_kernel,
                    {"LP": "*fp32", "REF": "*fp32", "R": "*fp32", "ROWS": "*i64", "STARTS": "*i64", "COUNTS": "*i64",
                     "ETA": "*fp32", "ALPHA": "*fp32", "OUT_GROUP": "*fp32", "OUT": "*fp32"},
                    {"N": "i32", "beta": "fp32", "tau": "fp32", "scale": "fp32"},
                    {"EXACT": exact, "BLOCK_K": 64, "BLOCK_J": 32})


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("all", "head"):
        head_kernels()
    if which in ("all", "loss"):
        loss_kernels()
