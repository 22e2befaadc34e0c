"""CPU benchmark of the mmcpt data path.

1. Collator throughput (images/s, tokens/s) for a few source image sizes: decode + processor
   (resize/normalise to the processor's size, text expansion, padding, label masking).
2. Time to resume a streaming run at step N (10, 100, 1000): the time until the first batch after
   the resume point is ready, with
   - cache: ignore_data_skip + dataset_prepared_path (seek in the stream cache),
   - re-encode: ignore_data_skip without a cache (the text of trained rows is re-tokenized, no image
     is decoded),
   - fast-forward: what HF Trainer does without ignore_data_skip (accelerate.skip_first_batches: every
     trained batch goes through the collator again, images decoded and processed).
   The image loads each variant performs are counted.

Usage: python plugins/mmcpt/bench/bench_mmcpt.py [--workdir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def build_processor(model_dir: Path, size: int, seq: int):
    from transformers import AutoProcessor, Gemma3ImageProcessorPil, Gemma3Processor

    base = AutoProcessor.from_pretrained(str(model_dir))
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
                           tokenizer=base.tokenizer, image_seq_length=seq)


def collator_throughput(model_dir: Path, work: Path, sizes, batches: int, bs: int = 8):
    from host_plugin_mmcpt import testing as mmt
    from host_plugin_mmcpt.collate import MultimodalCollator
    from host_plugin_mmcpt.config import MultimodalPretrainDataset
    from host_plugin_mmcpt.encode import ImageTokenSpec, RowEncoder

    proc_size, seq = 224, 64
    processor = build_processor(model_dir, proc_size, seq)
    cfg = SimpleNamespace(sequence_len=4096, pad_to_sequence_len=False, skip_bad_rows=False, remote_image_timeout=5)
    spec = ImageTokenSpec.from_processor(processor)
    collate = MultimodalCollator(cfg, processor.tokenizer, processor)
    out = []
    for size in sizes:
        images = work / f"imgs{size}"
        rows = mmt.make_rows(images, bs * batches, size=(size, size), text_every=0, prefix=f"i{size}_")
        entry = MultimodalPretrainDataset(path="bench", image_base_dir=str(images))
        enc = RowEncoder(cfg, entry, processor.tokenizer, spec, str(images), 5)
        prepared = [enc.encode(r, i, "bench") for i, r in enumerate(rows)]
        collate(prepared[:bs])  # warm-up
        times, tokens = [], 0
        for b in range(batches):
            t0 = time.perf_counter()
            batch = collate(prepared[b * bs : (b + 1) * bs])
            times.append(time.perf_counter() - t0)
            tokens += int(batch["attention_mask"].sum())
        total = sum(times)
        out.append({"source px": f"{size}x{size}", "processor px": f"{proc_size}x{proc_size}", "batch": bs,
                    "ms/batch": round(1000 * statistics.median(times), 1),
                    "images/s": round(bs * batches / total, 1), "tokens/s": round(tokens / total)})
    return out


def resume_benchmark(model_dir: Path, work: Path, steps_list, bs: int = 2, image_px: int = 256):
    import torch.utils.data as tud
    from accelerate import skip_first_batches

    from host_plugin_mmcpt import testing as mmt
    from host_plugin_mmcpt.collate import MultimodalCollator
    from host_plugin_mmcpt.config import MultimodalPretrainDataset
    from host_plugin_mmcpt.encode import ImageTokenSpec, RowEncoder
    from host_plugin_mmcpt.images import STATS
    from host_plugin_mmcpt.stream import JsonlSource, MMStream, StreamCache, as_iterable_dataset

    processor = build_processor(model_dir, 224, 64)
    n_rows = bs * (max(steps_list) + 5)
    images = work / "stream-images"
    data = work / "stream.jsonl"
    if not data.exists():
        mmt.write_jsonl(data, mmt.make_rows(images, n_rows, size=(image_px, image_px), text_every=0, prefix="s"))
    cfg = SimpleNamespace(sequence_len=512, pad_to_sequence_len=False, skip_bad_rows=False, remote_image_timeout=5)
    spec = ImageTokenSpec.from_processor(processor)
    entry = MultimodalPretrainDataset(path=str(data), image_base_dir=str(images))
    encoder = RowEncoder(cfg, entry, processor.tokenizer, spec, str(images), 5)
    collate = MultimodalCollator(cfg, processor.tokenizer, processor)
    source = JsonlSource([str(data)], "bench")
    key = {"bench": str(data)}
    cache_root = work / "cache"
    fill = StreamCache(cache_root, key, source.start_state())
    if not fill.meta["complete"]:
        t0 = time.perf_counter()
        for _ in MMStream(encoder, source, fill, 0, False, "bench"):
            pass
        print(f"filled the stream cache with {fill.rows} rows in {time.perf_counter() - t0:.1f} s")
    fill.close()
    fill._lockfh.close()
    fill.meta["complete"] = False  # make every variant below behave as if the stream goes on

    def first_batch(stream, skip_batches: int = 0):
        loader = tud.DataLoader(as_iterable_dataset(stream), batch_size=bs, collate_fn=collate)
        if skip_batches:
            loader = skip_first_batches(loader, skip_batches)
        STATS.reset()
        t0 = time.perf_counter()
        batch = next(iter(loader))
        return time.perf_counter() - t0, STATS.loads, STATS.headers, batch

    out = []
    for steps in steps_list:
        start = steps * bs
        cache = StreamCache(cache_root, key, source.start_state())
        cache.meta["complete"] = False
        t_cache, loads_cache, _, b1 = first_batch(MMStream(encoder, source, cache, start, False, "bench"))
        cache._lockfh.close()
        t_enc, loads_enc, heads_enc, b2 = first_batch(MMStream(encoder, source, None, start, False, "bench"))
        cache = StreamCache(cache_root, key, source.start_state())
        t_ff, loads_ff, _, b3 = first_batch(MMStream(encoder, source, cache, 0, False, "bench"), skip_batches=steps)
        cache._lockfh.close()
        assert b1["input_ids"].tolist() == b2["input_ids"].tolist() == b3["input_ids"].tolist()
        out.append({"resume at step": steps, "samples skipped": start,
                    "cache (s)": round(t_cache, 3), "cache image loads": loads_cache,
                    "re-encode (s)": round(t_enc, 3), "re-encode image loads (header reads)": f"{loads_enc} ({heads_enc})",
                    "fast-forward (s)": round(t_ff, 3), "fast-forward image loads": loads_ff})
    return out


def table(rows) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    import platform

    import torch

    from host_plugin_mmcpt import testing as mmt

    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mmcpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = mmt.build_tiny_vl(work / "tiny-vl")
    sizes = [64, 256] if args.quick else [64, 256, 512, 1024]
    steps = [10, 100] if args.quick else [10, 100, 1000]
    coll = collator_throughput(model_dir, work, sizes, batches=4 if args.quick else 12)
    res = resume_benchmark(model_dir, work, steps)
    print(f"\nCPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("\nCollator throughput (Gemma3 PIL image processor at 224x224, 64 image tokens, 1 image per row):")
    print(table(coll))
    print("\nResume a streaming run at step N (micro_batch_size 2, 256x256 PNGs, time to the first new batch):")
    print(table(res))


if __name__ == "__main__":
    main()
