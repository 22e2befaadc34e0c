"""``host merge-lora``: fold a trained LoRA adapter into the base weights."""

from __future__ import annotations

from pathlib import Path

from host.errors import ConfigError


def merge(cfg, pm, out: Path | None = None) -> Path:
    """Load base + adapter from ``output_dir``, merge, and save a plain transformers model.

    Plugins run their model hooks as in training (``model_init_kwargs`` with purpose ``"merge"``), so a plugin
    that cannot be merged (e.g. quantized experts) can refuse there with a clear error.
    """
    from peft import PeftModel

    from host import model as model_mod
    from host.tokens import fit_embeddings

    adapter_dir = Path(cfg.output_dir)
    if cfg.adapter is None:
        raise ConfigError("adapter: merge-lora needs a LoRA adapter (adapter: lora); a full fine-tune is already merged.")
    if not (adapter_dir / "adapter_config.json").exists():
        raise ConfigError(f"output_dir: no trained adapter in {adapter_dir} (adapter_config.json missing); run `host train` first.")
    target = Path(out) if out else adapter_dir / "merged"
    check_target(target)
    pm.hook.pre_model_load(cfg=cfg)
    tokenizer, processor = model_mod.load_tokenizer_and_processor(cfg)
    base = model_mod.load_model(cfg, model_mod.plugin_init_kwargs(cfg, pm, "merge"))
    fit_embeddings(base, tokenizer)  # room for the tokens the config added, as in training
    pm.hook.post_model_load(cfg=cfg, model=base)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    pm.hook.post_model_build(cfg=cfg, model=model)
    merged = model.merge_and_unload()
    target.mkdir(parents=True, exist_ok=True)
    (target / MERGED_MARKER).write_text("written by host merge-lora\n")  # first: a killed merge can be redone
    merged.save_pretrained(target)
    (processor or tokenizer).save_pretrained(target)
    return target


#: Written into every directory ``host merge-lora`` creates; only such a directory is written over.
MERGED_MARKER = "host_merged"


def check_target(target: Path) -> None:
    """Refuse a target that is a file, or a non-empty directory a previous merge did not create:
    saving would overwrite the user's files (config.json, weights) there."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out: {target} is an existing file; give a directory path (nothing was written).")
    if target.is_dir() and any(target.iterdir()) and not (target / MERGED_MARKER).exists():
        raise ConfigError(
            f"--out: {target} is not empty and was not written by host merge-lora; merging there would overwrite "
            f"its files. Give a new or empty directory (nothing was written)."
        )
