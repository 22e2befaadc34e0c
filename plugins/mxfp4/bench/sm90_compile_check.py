"""Compile strategy B's kernel (``kernels._fp4_s2s_kernel``) for sm_90a on a machine without a GPU and report ptxas's
registers and spills, the MMA instructions (wgmma = Hopper's async warpgroup MMA) and the MMA waits in the PTX, per
launch kind and autotune config (``kernels._configs``). A config that spills, or falls back from wgmma, shows here
before a device call. Usage: python bench/sm90_compile_check.py [--fp16] [--decode asm|fp32]
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

from host_plugin_mxfp4 import kernels as K  # noqa: E402

PTR_T = {"Wq": "*u8", "Sc": "*u8", "XA_out": "*fp32", "ssi_ptr": "*i64", "offsets_ptr": "*i64"}
PTRS = {"X", "Wq", "Sc", "Y", "A", "Bm", "XA_out", "Bias", "ssi_ptr", "offsets_ptr"}
# strides a real launch specialises to 1 (contiguous activations, packed bytes and scales along K, LoRA factors)
UNIT = {"s_xi", "s_wk", "s_sk", "s_yj", "s_ai", "s_br", "s_xar", "s_bias_j"}
#: (label, RED_IS_K, X_GROUPED, Y_GROUPED, LORA) of the four launches of a gated block
LAUNCHES = [("fwd up (gather, LoRA)", 1, False, True, 1), ("fwd down (grouped, LoRA)", 1, True, False, 1),
            ("dX down (gather, LoRA)", 0, False, True, 1), ("dX up (grouped, LoRA)", 0, True, False, 1)]


def compile_one(red_is_k, gin, gout, lora, cfg, dtype, decode_asm):
    fn = K._fp4_s2s_kernel
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            continue
        if name in UNIT:
            sig[name], const[name] = "constexpr", 1
            continue
        if name in PTRS:
            sig[name] = PTR_T.get(name, dtype)
        else:
            sig[name] = "fp32" if name == "scaling" else "i32"
        if name not in ("scaling", "FAN_OUT", "R"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    const.update(RED_IS_K=red_is_k, SCALE_KIND=K.SCALE_E8M0, FP4_BLOCK=32, X_GROUPED=gin, Y_GROUPED=gout, LORA=lora,
                 WRITE_XA=bool(lora), HAS_BIAS=False, INT64=False, DOT_PREC="tf32", E_POW2=128, BLOCK_R=16,
                 DECODE_ASM=decode_asm, EVEN_I=True, **cfg.kwargs)
    for k in const:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = ck.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    cubin = f.name[:-4] + ".cubin"
    info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", cubin], capture_output=True, text=True)
    info = info.stderr + info.stdout
    loop = main_loop(subprocess.run([os.path.join(os.path.dirname(ptxas), "nvdisasm"), "-c", cubin],
                                    capture_output=True, text=True).stdout)
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return dict(regs=int(regs.group(1)) if regs else None, spill=int(spill.group(1)) if spill else None,
                wgmma=ptx.count("wgmma.mma_async"), waits=ptx.count("wgmma.wait_group"), mma_sync=ptx.count("mma.sync"),
                smem=ck.metadata.shared, **loop)


def main_loop(sass: str) -> dict:
    """The innermost SASS loop with HGMMAs (the K loop): its instruction count, HGMMAs and integer/bf16x2 ALU
    instructions (LOP3, SHF, PRMT, IMAD/IADD3, HFMA2/HMUL2) and fp32 ones (FMUL/FFMA, F2F/F2FP conversions)."""
    lines = [ln.split("*/", 1)[1].strip() if "*/" in ln else ln.strip() for ln in sass.splitlines()]
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.match(r"^\.L_x_\d+:$", ln)}
    best = (0, 0, 0)
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\W.*?(\.L_x_\d+)", ln)
        if m and labels.get(m.group(1), i) < i:
            lo = labels[m.group(1)]
            n = sum("HGMMA" in x for x in lines[lo:i])
            if n and (not best[0] or i - lo < best[2] - best[1]):
                best = (n, lo, i)
    body = [x for x in lines[best[1]:best[2] + 1] if x and not x.startswith(".")]
    count = lambda *ops: sum(any(re.match(rf"^(@!?U?P\d+ )?{o}\b", x) for o in ops) for x in body)  # noqa: E731
    return dict(loop=len(body), hgmma=best[0], int_alu=count("LOP3", "SHF", "PRMT", "IMAD", "IADD3", "LEA", "SGXT"),
                bf16x2=count("HFMA2", "HMUL2"), f32=count("FMUL", "FFMA", "F2F", "F2FP"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp16", action="store_true", help="fp16 activations (default bf16)")
    ap.add_argument("--decode", choices=("asm", "fp32"), default="asm", help="the E2M1 decode (kernels.DECODE)")
    args = ap.parse_args()
    dtype = "*fp16" if args.fp16 else "*bf16"
    print(f"triton {triton.__version__}, target sm_90a, {dtype[1:]}, decode {'fp32' if args.fp16 else args.decode}")
    print(f"{'launch':<26}{'tile bm,bj,bi,w,s,swap':<24}{'regs':>6}{'spill B':>9}{'wgmma':>7}{'waits':>7}"
          f"{'mma.sync':>9}{'smem':>8} | K loop (SASS): {'instr':>6}{'hgmma':>6}{'int':>6}{'bf16x2':>7}{'f32':>6}")
    for label, red_is_k, gin, gout, lora in LAUNCHES:
        for cfg in K._configs():
            kw = cfg.kwargs
            tile = f"{kw['BLOCK_M']},{kw['BLOCK_J']},{kw['BLOCK_I']},{cfg.num_warps},{cfg.num_stages},{kw['SWAP']}"
            try:
                asm = args.decode == "asm" and not args.fp16
                r = compile_one(red_is_k, gin, gout, lora, cfg, dtype, asm)
                print(f"{label:<26}{tile:<24}{r['regs']!s:>6}{r['spill']!s:>9}{r['wgmma']:>7}{r['waits']:>7}"
                      f"{r['mma_sync']:>9}{r['smem']:>8} |                {r['loop']:>6}{r['hgmma']:>6}{r['int_alu']:>6}"
                      f"{r['bf16x2']:>7}{r['f32']:>6}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{label:<26}{tile:<24} failed: {repr(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
