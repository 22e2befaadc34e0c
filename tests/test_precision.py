"""The host keeps torch's legacy precision getter working for Inductor's GEMM autotuning."""

import pytest

from host.precision import fix_mixed_matmul_precision


def test_mixed_matmul_precision_api_is_repaired():
    """transformers sets torch.backends.fp32_precision="tf32" when compiling on a GPU; Inductor's GEMM
    autotuning then reads torch.get_float32_matmul_precision(), which raises on that state."""
    import torch

    torch.backends.fp32_precision = "tf32"
    try:
        with pytest.raises(RuntimeError, match="legacy and new"):
            torch.get_float32_matmul_precision()
        assert fix_mixed_matmul_precision() == "high"
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.mkldnn.matmul.fp32_precision == "tf32"
        assert fix_mixed_matmul_precision() is None  # consistent now: nothing to do
    finally:
        torch.set_float32_matmul_precision("highest")
