"""axolotl's data-parallel sizes, ``dp_shard_size`` and ``dp_replicate_size``, where they describe what host does.

In axolotl they shape an N-D device mesh: ``dp_shard_size`` ranks shard the model (FSDP) and
``dp_replicate_size`` groups of them hold replicas (hybrid sharding). Host shards over every rank under
FSDP and replicates over every rank under DDP, so it accepts the sizes that say exactly that:
``dp_shard_size`` equal to the world size (with FSDP), ``dp_replicate_size`` equal to the world size
(without FSDP). Hybrid sharding (both above 1) is refused at validation; a size the launch's world size
does not match is an error when training starts, before anything loads.
"""

from __future__ import annotations

import os

from host.errors import ConfigError


def errors(cfg) -> list[str]:
    out = []
    shard, replicate = cfg.dp_shard_size, cfg.dp_replicate_size
    if shard and shard > 1 and not cfg.fsdp_enabled:
        out.append("dp_shard_size: sharding needs FSDP (as in axolotl); add fsdp_config (e.g. fsdp_version: 2), or remove dp_shard_size.")
    if replicate and replicate > 1 and cfg.fsdp_enabled:
        out.append(
            "dp_replicate_size: replicas of FSDP shard groups (hybrid sharding) are not in host; FSDP shards over all "
            "ranks: remove dp_replicate_size (and set dp_shard_size to the number of GPUs, or leave it out)."
        )
    if replicate and replicate > 1 and cfg.deepspeed:
        out.append("dp_replicate_size: DeepSpeed decides replication itself; remove dp_replicate_size.")
    return out


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world(cfg, world: int | None = None) -> None:
    """Raise when ``dp_shard_size``/``dp_replicate_size`` do not match the launch's world size."""
    world = world_size() if world is None else world
    for key in ("dp_shard_size", "dp_replicate_size"):
        size = getattr(cfg, key)
        if size and size != world:
            what = "shards over" if key == "dp_shard_size" else "replicates over"
            raise ConfigError(
                f"{key}: {size}, but this launch has {world} process(es); host {what} every rank, so launch "
                f"{size} processes (torchrun --nproc-per-node=..., across nodes if needed), or set {key}: {world} or remove it."
            )
