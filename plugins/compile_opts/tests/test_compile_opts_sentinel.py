"""Sentinel: every allowlisted flag exists on the installed torch, with the type the allowlist says.

Fails on a torch upgrade that renames or removes a flag, so the allowlist is fixed before users hit
the validation error.
"""

from __future__ import annotations

import pytest
import torch

from host_plugin_compile_opts import options as opts
from host_plugin_compile_opts.options import ALLOWLIST

ISSUE_KEYS = {
    "coordinate_descent_tuning",
    "coordinate_descent_check_all_directions",
    "shape_padding",
    "epilogue_fusion",
    "max_autotune_gemm",
    "fx_graph_cache",
    "assume_aligned_inputs",
    "comprehensive_padding",
    "decompose_mem_bound_mm",
    "triton.cudagraphs",
}


def test_allowlist_is_the_issue_list():
    assert set(ALLOWLIST) == ISSUE_KEYS


@pytest.mark.parametrize("key", sorted(ALLOWLIST))
def test_flag_exists_on_installed_torch(key):
    config = opts.inductor_config()
    assert opts.has_flag(config, key), f"torch {torch.__version__} has no torch._inductor.config.{key}"
    value = opts.read_flag(config, key)
    assert opts.type_ok(ALLOWLIST[key], value), (
        f"torch {torch.__version__}: torch._inductor.config.{key} is {value!r} ({type(value).__name__}), "
        f"the allowlist expects {ALLOWLIST[key].__name__}"
    )


def test_lookup_walks_dotted_keys_not_literal_names():
    config = opts.inductor_config()
    assert opts.read_flag(config, "triton.cudagraphs") is config.triton.cudagraphs
    assert not opts.has_flag(config, "triton.no_such_flag")
    assert not opts.has_flag(config, "no_such_group.cudagraphs")
