"""Compile the scatter2scatter kernel for sm_90a on a machine without a GPU and report ptxas's registers,
spills and the MMA instructions (wgmma = Hopper's async warpgroup MMA), per variant and tile.
``--glu``: also the fused tail's GLU-backward epilogue (``GLU_BWD=1``); ``--light``: the merged node's light tail
(``GLU_BWD=2``: gate scaling + routing-weight gradient against the saved activation; ``3``: gate scaling only);
``--glu-fwd``: the up projection with the SiLU-GLU in its epilogue (``GLU_FWD``: the tile's ``bn`` output columns are
``bn/2`` gate and ``bn/2`` up columns, two W tiles / TMA boxes of ``bn/2`` per K step).

A check that costs no device time: a variant that does not compile, spills, or falls back from
wgmma shows here before a GPU run. Usage: python bench/sm90_compile_check.py [--glu] [--light] [--glu-fwd] [--tma] [--router] [--tiles 128,128,64,8,3 ...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from host_plugin_scattermoe import kernels as K  # noqa: E402

PTRS = ["X", "W", "Y", "A", "Bm", "XA_in", "XA_out", "Bias", "ssi_ptr", "offsets_ptr", "Gates", "Hin", "DGP"]
FP32_ARGS = {"scaling", "glu_alpha", "glu_limit"}
PTR_T = {"XA_in": "*fp32", "XA_out": "*fp32", "ssi_ptr": "*i64", "offsets_ptr": "*i64", "Gates": "*fp32", "DGP": "*fp32"}


# the stride arguments a launch at a real shape specialises to 1 (Triton turns an int argument equal to 1
# into a constant, which is what lets it vectorise and pipeline the loads); the other ints and every
# pointer are multiples of 16 there
UNIT = {"s_xk", "s_wk", "s_yn", "s_ak", "s_bn", "s_xar", "s_bias_n"}
UNIT_DX = {"s_xk", "s_wn", "s_yn", "s_ak", "s_bn", "s_xar", "s_bias_n"}


def compile_variant(glu: int, lora: int, gin: bool, gout: bool, dx: bool, bm, bn, bk, w, s, tma: bool = False,
                    persistent: bool = False, half_tail: bool = False, glu_fwd: int = 0, ws: bool = False,
                    bias: bool = False):
    fn = K._s2s_kernel
    if glu_fwd == 1:  # the kernel's BLOCK_N is the half tile (kernels._s2s_plan)
        bn //= 2
    sig, const, attrs = {}, {}, {}
    unit = UNIT_DX if dx else UNIT
    for i, name in enumerate(fn.arg_names):
        p = fn.params[i]
        if p.is_constexpr:
            continue
        if name in unit:
            sig[name] = "constexpr"
            const[name] = 1
            continue
        if name == "Wd":
            sig[name] = (f"tensordesc<bf16[{bk}, {bn}]>" if dx else f"tensordesc<bf16[{bn}, {bk}]>") if tma else "*bf16"
            continue
        if ws and lora == 2 and name == "XA_in":  # the warp-specialised tile's LoRA operands are descriptors
            sig[name] = f"tensordesc<fp32[{bm}, 16]>"
            continue
        if ws and lora == 2 and name == "Bm":
            sig[name] = f"tensordesc<bf16[16, {bn}]>"
            continue
        if name == "Xd":
            sig[name] = f"tensordesc<bf16[{bm}, {bk}]>" if (tma and gin) else "*bf16"
            continue
        if name in PTRS:
            sig[name] = PTR_T.get(name, "*bf16")
        elif name in FP32_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if name not in FP32_ARGS and name not in ("FAN_OUT", "R"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    const.update(
        X_GROUPED=gin, Y_GROUPED=gout, LORA=lora, WRITE_XA=lora == 1, HAS_BIAS=bias, INT64=False, DOT_PREC="tf32",
        E_POW2=128, BLOCK_R=16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=True, EVEN_N=True, GLU_BWD=int(glu),
        W_DESC=(2 if dx else 1) if tma else 0, X_DESC=bool(tma and gin), PERSISTENT=persistent,
        HALF_TAIL=half_tail, GLU_FWD=glu_fwd, WS=ws,
    )
    return compile_stats(fn, sig, const, w, s, attrs)


def compile_stats(fn, sig: dict, const: dict, w: int, s: int, attrs: dict | None = None) -> dict:
    """Compile ``fn`` for sm_90a (``sig``: the runtime arguments' types, ``const``: the constexprs) and read ptxas's
    registers and spills and the PTX's MMA / copy instruction counts."""
    for k2 in const:
        sig[k2] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs or {})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": w, "num_stages": s})
    ptx = ck.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    info = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else None,
        "wgmma": ptx.count("wgmma.mma_async"),
        "cp_async": ptx.count("cp.async.ca") + ptx.count("cp.async.cg"),
        "tma": ptx.count("cp.async.bulk.tensor"),
        "setmaxnreg": ptx.count("setmaxnreg"),
        "mma_sync": ptx.count("mma.sync"),
        "shared": ck.metadata.shared,
        "warps": ck.metadata.num_warps,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", nargs="*", default=["128,128,64,8,3", "128,256,64,8,3", "128,64,64,8,3", "64,128,64,4,4"])
    ap.add_argument("--tma", action="store_true", help="the TMA-descriptor variants (W always, x when grouped)")
    ap.add_argument("--glu", action="store_true", help="also the GLU-backward epilogue variants")
    ap.add_argument("--light", action="store_true", help="also the light tail's gate/dgates epilogue variants")
    ap.add_argument("--glu-fwd", action="store_true", help="also the up projection with the SiLU-GLU epilogue")
    ap.add_argument("--half-tail", action="store_true", help="an expert's last row block of <= BLOCK_M/2 rows as a half tile")
    ap.add_argument("--persistent", action="store_true", help="the persistent grid (one program per SM, flattened loop)")
    ap.add_argument("--ws", action="store_true", help="the warp-specialised tile of the grouped-input launches (TMA, "
                    "split LoRA epilogue; Triton's Hopper pass: give num_warps 4, it adds a producer warp group)")
    ap.add_argument("--router", action="store_true", help="the fused router's kernels (router_kernels.py) at the "
                    "bench's expert counts, with the launch plan's tiles and warps")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_90a")
    if args.router:
        return router_check()
    print(f"{'variant':<34}{'tile bm,bn,bk,w,s':<20}{'regs':>6}{'spill B':>9}{'wgmma':>7}{'mma.sync':>9}{'cp.async':>9}{'tma':>5}{'smem':>8}")
    variants = [("fwd up (gather, LoRA fused)", False, 1, False, True, False),
                ("fwd up (gather, split epilogue)", False, 2, False, True, False),
                ("fwd down (grouped in, LoRA fused)", False, 1, True, False, False),
                ("dX up (grouped in, LoRA fused)", False, 1, True, False, True),
                ("dX down (plain store)", False, 1, False, True, True)]
    if args.glu:
        variants += [("dX down + GLU/combine epilogue", True, 1, False, True, True),
                     ("dX down + GLU epilogue, split", True, 2, False, True, True)]
    if args.light:
        variants += [("dX down + gate/dg epilogue (light)", 2, 1, False, True, True),
                     ("dX down + gate/dg, split (light)", 2, 2, False, True, True),
                     ("dX down + gate only (light, no dg)", 3, 1, False, True, True)]
    if args.glu_fwd:
        variants += [("fwd up + SiLU-GLU (LoRA fused)", "fwd", 1, False, True, False),
                     ("fwd up + SiLU-GLU (split epilogue)", "fwd", 2, False, True, False),
                     ("fwd up + SiLU-GLU (no LoRA)", "fwd", 0, False, True, False),
                     # gpt-oss stores W1 [E, H, 2I] (N contiguous: the dX launches' W layout and unit strides)
                     ("fwd up + clamped GLU (gpt-oss, LoRA)", "oss", 1, False, True, True)]
    if args.ws:
        variants = [("fwd down (grouped in, split, WS)", False, 2, True, False, False),
                    ("dX up (grouped in, split, WS)", False, 2, True, False, True),
                    ("fwd down (grouped in, no LoRA, WS)", False, 0, True, False, False),
                    ("fwd down + bias (gpt-oss, split, WS)", "bias", 2, True, False, False)]
    for label, glu, lora, gin, gout, dx in variants:
        for t in args.tiles:
            bm, bn, bk, w, s = map(int, t.split(","))
            try:
                r = compile_variant(0 if glu in ("fwd", "oss", "bias") else glu, lora, gin, gout, dx, bm, bn, bk, w, s, args.tma,
                                    args.persistent, args.half_tail, glu_fwd={"fwd": 1, "oss": 2}.get(glu, 0),
                                    ws=args.ws, bias=glu == "bias")
                print(f"{label:<34}{t:<20}{r['regs']!s:>6}{r['spill_stores']!s:>9}{r['wgmma']:>7}{r['mma_sync']:>9}"
                      f"{r['cp_async']:>9}{r['tma']:>5}{r['shared']:>8}{r['setmaxnreg']:>4}{r['warps']:>4}")
            except Exception as e:  # noqa: BLE001
                print(f"{label:<34}{t:<20} failed: {repr(e)[:200]}")


def router_check():
    import torch

    from host_plugin_scattermoe import router_kernels as RK

    print(f"{'router kernel':<12}{'E':>5}{'k':>4}{'H':>6}{'dtype':>7}{'regs':>6}{'spill B':>9}{'mma':>5}{'smem':>8}{'warps':>6}")
    for E, k, H, mode, bias in [(128, 8, 2048, 0, False), (256, 8, 2048, 0, False), (64, 8, 2048, 0, False),
                                (8, 2, 4096, 0, False), (32, 4, 2880, 1, True), (512, 10, 4096, 0, False)]:
        for dt, tn in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            for kind in ("fwd", "bwd"):
                flags = (mode, True, bias) if kind == "fwd" else (mode, True, False, True, False)
                _, kw, _ = RK._plan(kind, 4096, E, H, k, dt, flags)
                kw = dict(kw)
                w, st = kw.pop("num_warps"), kw.pop("num_stages", 3)
                if kind == "fwd":
                    fn, names = RK._router_fwd_kernel, "X W Bias Logits Scores Idx"
                    ints = "T E H stride_x stride_w"
                else:
                    fn, names = RK._router_bwd_kernel, "Logits GScores Idx GLogits W DX DL"
                    ints = "T E H stride_l stride_w stride_dx"
                sig = {n: ("*i64" if n == "Idx" else f"*{tn}") for n in names.split()}
                sig.update({n: "i32" for n in ints.split()})
                r = compile_stats(fn, sig, kw, w, st)
                print(f"{kind:<12}{E:>5}{k:>4}{H:>6}{tn:>7}{r['regs']!s:>6}{r['spill_stores']!s:>9}"
                      f"{r['wgmma'] + r['mma_sync']:>5}{r['shared']:>8}{r['warps']:>6}")


if __name__ == "__main__":
    main()
