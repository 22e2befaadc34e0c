"""host plugin compile_opts: ``torch_compile_options``, allowlisted ``torch._inductor.config`` flags.

The HF Trainer forwards only ``torch_compile``, its backend and its mode to ``torch.compile``; Inductor
flags such as ``max_autotune_gemm`` otherwise need a monkey-patch before training. This plugin takes
them from the config, checks them before any model loads (``validate_config``), sets them when
training begins and puts the old values back when it ends (``trainer_callbacks``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from host import hookimpl
from host.config import StrictModel

REQUIRES: list[str] = []


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"triton": {"cudagraphs": true}}`` -> ``{"triton.cudagraphs": true}`` (nested YAML is allowed)."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            out.update(_flatten(item, name + "."))
        else:
            out[name] = item
    return out


class CompileOptsConfig(StrictModel):
    """This plugin's top-level config key."""

    torch_compile_options: dict[str, bool | int | float | str] | None = Field(
        None,
        description=(
            "torch._inductor.config flags to set while training (dotted keys for nested flags, e.g. "
            "triton.cudagraphs). Only allowlisted keys; needs torch_compile. None: change nothing."
        ),
    )

    @field_validator("torch_compile_options", mode="before")
    @classmethod
    def _scalars(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        flat = _flatten(value)
        for key, item in flat.items():
            if not isinstance(item, (bool, int, float, str)):
                raise ValueError(
                    f"torch_compile_options.{key} must be a single value (true/false, a number or a string), "
                    f"got {item!r}"
                )
        return flat


@hookimpl
def config_model():
    return CompileOptsConfig


@hookimpl
def validate_config(cfg):
    from host_plugin_compile_opts.options import check

    return check(cfg)


@hookimpl
def trainer_callbacks(cfg):
    if not cfg.torch_compile_options:
        return []
    from host_plugin_compile_opts.callback import CompileOptionsCallback

    return [CompileOptionsCallback(cfg.torch_compile_options)]
