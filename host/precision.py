"""fp32 matmul precision: keep torch's legacy getter working after transformers used the new API."""

from __future__ import annotations

import logging

log = logging.getLogger("host.train")

_LEGACY_MODES = {("ieee", "ieee"): "highest", ("tf32", "tf32"): "high", ("tf32", "bf16"): "medium"}


def _resolved(backend) -> str:
    import torch

    for value in (backend.fp32_precision, torch.backends.fp32_precision):
        if value != "none":
            return value
    return "ieee"


def fix_mixed_matmul_precision() -> str | None:
    """Re-state fp32 matmul precision through the legacy API when only the new API was used.

    With ``torch_compile`` on an Ampere+ GPU, transformers' TrainingArguments sets
    ``torch.backends.fp32_precision = "tf32"`` (the per-backend API of torch >= 2.9). From then on
    ``torch.get_float32_matmul_precision()`` raises "mix of the legacy and new APIs", and Inductor
    calls exactly that while autotuning GEMMs (``max_autotune_gemm``, max-autotune modes), so the
    compile fails. Setting the equivalent legacy mode keeps every precision as it was and makes the
    getter work. Returns the mode set, or None when nothing was wrong (or it cannot be represented).
    """
    import torch

    try:
        torch.get_float32_matmul_precision()
        return None
    except RuntimeError:
        pass
    try:
        pair = (_resolved(torch.backends.cuda.matmul), _resolved(torch.backends.mkldnn.matmul))
    except AttributeError:
        return None
    mode = _LEGACY_MODES.get(pair)
    if mode is None:
        log.warning(
            "fp32 matmul precision (cuda %s, mkldnn %s) was set through torch's per-backend API and "
            "has no legacy equivalent; Inductor GEMM autotuning may fail reading it",
            *pair,
        )
        return None
    torch.set_float32_matmul_precision(mode)
    log.info(
        "fp32 matmul precision (cuda %s, mkldnn %s) was set only through torch's per-backend API, "
        "which makes Inductor's GEMM autotuning fail; re-stated as torch.set_float32_matmul_precision(%r) "
        "(same precisions)",
        *pair,
        mode,
    )
    return mode
