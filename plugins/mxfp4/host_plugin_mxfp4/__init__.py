"""host plugin ``mxfp4``: LoRA training on MoE models whose expert weights stay 4-bit.

Expert parameters are held as packed FP4 (MXFP4, or NVFP4) in :class:`formats.FP4Weights`
containers; LoRA adapters (PEFT ``target_parameters``) train on top through the ``scattermoe``
plugin's routing and LoRA helpers. See README.md.
"""

from __future__ import annotations

from host import hookimpl

REQUIRES = ["scattermoe"]
