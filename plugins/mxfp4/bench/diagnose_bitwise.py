"""Why strategy A is not bitwise scattermoe-on-dequantized for a family (test_mxfp4_gpu's check), on the GPU or on
the CPU (TRITON_INTERPRET=1, a small shape; set scattermoe's backend to triton to take the GPU's dispatch).

Runs ``bench_mxfp4.correctness`` at the test's shape and prints, for every scattermoe experts call
(``ops.glu_experts`` / ``ops.scattered_experts``) made by A and by the reference, each tensor argument's
dtype, shape, strides and a checksum, so the first argument that differs between the two calls shows up.

Usage: python plugins/mxfp4/bench/diagnose_bitwise.py [gpt_oss|qwen3_moe]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def describe(v):
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype)[6:]}{tuple(v.shape)}s{tuple(v.stride())} sum={v.double().sum().item():.6e}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(describe(t) for t in v) + ")"
    return repr(v)


def traced(name, fn):
    def wrapper(*args, **kwargs):
        print(f"CALL {name}", flush=True)
        for i, a in enumerate(args):
            print(f"  arg{i}: {describe(a)}")
        for k, v in kwargs.items():
            print(f"  {k}: {describe(v)}")
        return fn(*args, **kwargs)

    return wrapper


def main(family):
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_mxfp4 as B
    from host_plugin_scattermoe import ops

    from host_plugin_mxfp4 import experts as fx
    from host_plugin_mxfp4 import loading

    ops.glu_experts = traced("glu_experts", ops.glu_experts)
    ops.scattered_experts = traced("scattered_experts", ops.scattered_experts)
    small = B.DEV == "cpu"  # CPU (TRITON_INTERPRET=1): a small shape, same code path
    E, H, I, k, T = (8, 64, 64, 2, 32) if small else (32, 1024, 512, 4, 1024)
    spec = dict(family=family, E=E, H=H, I=I, k=k)
    B.T_TOKENS = T
    ex = B.make_experts(**spec)
    blk = B.add_lora(B.Block(ex))
    loading.quantize_module(ex, "mxfp4")
    fx.install(blk)
    g = torch.Generator(device=B.DEV).manual_seed(3)
    x0 = torch.randn(T, H, generator=g, device=B.DEV).to(B.DTYPE)
    dy = torch.randn(T, H, generator=g, device=B.DEV).to(B.DTYPE)
    routes = {kind: B.routing(T, E, k, kind) for kind in ("balanced", "skewed")}
    checks = []
    B.correctness("diag", spec, blk, ex, x0, dy, routes, checks, strategies=("selective",))
    print("SUMMARY", family, "bitwise" if all(c["bitwise"] for c in checks) else "DIFFERS",
          [f"{c['check'].split(' vs ')[0]}={c['rel_err']:.1e}" for c in checks])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpt_oss")
