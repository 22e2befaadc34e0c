"""Address sanitizer for the Triton interpreter (CPU): every masked-in lane of every load/store
must fall inside the storage of a live CPU tensor. Runs the strategy B experts forward+backward of
a small PEFT-wrapped experts module (the real module path, scattermoe's dA/dB/combine included),
then a self-test showing an out-of-range access is caught.

Usage: python plugins/mxfp4/bench/sanitize_interpreter.py qwen3_moe|gpt_oss
"""
import gc, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import numpy as np
import torch
import triton.runtime.interpreter as ti

RANGES = []
def refresh():
    global RANGES
    rs = []
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu" and o.numel() > 0:
                st = o.untyped_storage()
                rs.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
        except Exception:
            pass
    RANGES = sorted(set(rs))
BAD = []
def check(ptrs, mask, size, kind):
    addrs = ptrs.data[mask.data.astype(bool)].astype(np.uint64).ravel()
    if addrs.size == 0:
        return
    starts = np.array([r[0] for r in RANGES], dtype=np.uint64); ends = np.array([r[1] for r in RANGES], dtype=np.uint64)
    idx = np.searchsorted(starts, addrs, side="right") - 1
    ok = (idx >= 0) & (addrs + np.uint64(size) <= ends[np.clip(idx, 0, None)])
    if not ok.all():
        BAD.append((kind, int((~ok).sum()), addrs[~ok][:3]))
        import traceback; traceback.print_stack(limit=12)
        raise SystemExit(f"OOB {kind}: {int((~ok).sum())} lanes")
orig_load, orig_store = ti.InterpreterBuilder.create_masked_load, ti.InterpreterBuilder.create_masked_store
def load(self, ptrs, mask, other, cp, vol):
    check(ptrs, mask, np.dtype(ti._get_np_dtype(ptrs.get_element_ty())).itemsize, "load")
    return orig_load(self, ptrs, mask, other, cp, vol)
def store(self, ptrs, value, mask, cp):
    check(ptrs, mask, value.data.dtype.itemsize, "store")
    return orig_store(self, ptrs, value, mask, cp)
ti.InterpreterBuilder.create_masked_load = load
ti.InterpreterBuilder.create_masked_store = store
orig_call = ti.GridExecutor.__call__
def call(self, *a, **k):
    refresh()
    return orig_call(self, *a, **k)
ti.GridExecutor.__call__ = call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_mxfp4 as B
from host_plugin_mxfp4 import experts as fx, loading
spec = dict(family=sys.argv[1], E=8, H=128, I=64, k=2)
ex = B.make_experts(**spec)
blk = B.add_lora(B.Block(ex))
loading.quantize_module(ex, "mxfp4")
fx.install(blk)
fx.SETTINGS["strategy"] = "fused"
x = torch.randn(48, 128, requires_grad=True)
idx, w = B.routing(48, 8, 2, "skewed")
out = blk.experts(x, idx, w)
out.backward(torch.randn_like(out))
print("clean", sys.argv[1], len(BAD))
# self-test: an out-of-range store must be caught
from host_plugin_mxfp4 import kernels as K
from host_plugin_mxfp4.formats import FP4Weights
from host_plugin_scattermoe.routing import sort_tokens
wq = FP4Weights.quantize(torch.randn(4, 64, 64), "mxfp4")
ii = torch.randint(0, 4, (8, 2)); sei, ssi, offs = sort_tokens(ii, 4)
bad_ssi = ssi + 1000  # scattered output rows far out of range
try:
    K.fp4_scatter2scatter(torch.randn(8, 64), wq, bad_ssi, offs, 2, grouped_out=False)
    print("sanitizer MISSED")
except SystemExit as e:
    print("sanitizer works:", e)
