"""Training data pipeline speed per CPU core: llava-jax vs transformers, same run (issue 4).

End to end from ArrayRecord shards (`llava-jax data build` output) to a device-ready batch:
the Grain loader (`make_loader`, num_workers=0: everything in this one process) and then
`global_batch` onto a CPU mesh of 4 devices (a TPU v5p host has 4 chips). Two cases:

  (a) LLaVA-1.5-7B, `pad` 336 px, 640x480 JPEGs (COCO-sized), a ~600-token vicuna_v1
      conversation (5 rounds), host batch 16, max_len 2048.
  (b) LLaVA-OneVision-7B, `anyres_max_9` 384 px, 1920x1080 JPEGs (16 views each), the same
      kind of conversation in qwen_1_5, host batch 4, max_len 8192, 37 views per row (the
      `onevision_si` config's static shape).

The transformers side does the same work from the same shards, in one process: decode the
same JPEG bytes with PIL (EXIF transpose, RGB), its processor (`LlavaProcessor` around
`LlavaImageProcessorPil(do_pad=True)`; `LlavaOnevisionProcessor`'s steps around
`LlavaOnevisionImageProcessorPil`, see `OnevisionProcessor`; built from config, nothing
downloaded) on the same
template text, which expands the image tokens and tokenizes, a label mask from the
tokenizer's offsets (assistant spans), padding into the same fixed-shape batch, and the
same `jax.make_array_from_process_local_data` onto the same mesh. Pixels and token ids of
one sample are asserted equal on both sides before timing.

Tokenizer (both sides): a LLaMA-like 32,000-token BPE (SentencePiece-style `▁` spaces,
BOS) trained with `tokenizers` on generated text (a Zipf-distributed 80,000-word
pseudo-language, ~1.5 tokens per word), plus the added tokens `<image>`, `<video>`,
`<|im_start|>`, `<|im_end|>`, `<pad>`; cached in --workdir.

Per core: the process is pinned to one CPU (--cpu) and we report samples per second of
wall time and samples per second of this process's CPU time (robust on a shared machine).

    python benchmarks/data_pipeline.py --workdir /tmp/dpbench
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
HF_LLAVA = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
            "do_pad": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}  # fmt: skip
HF_ONEVISION = {"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3, "resample": 3}  # fmt: skip
ADDED = ("<image>", "<video>", "<|im_start|>", "<|im_end|>", "<pad>")


# -- the tokenizer and the data -----------------------------------------------------------------


def lexicon(rng, n: int = 80_000):
    """`n` pseudo-words of 1-4 syllables, and Zipf probabilities for them."""
    import numpy as np

    onsets = [*"bcdfghjklmnprstvwz", "ch", "sh", "th", "st", "tr", "pl", "gr", "br", ""]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "nd", "ng", "ck"]
    syllables = np.array([o + v + c for o in onsets for v in vowels for c in codas])
    picks = rng.integers(0, len(syllables), (3 * n, 4))
    lengths = rng.integers(1, 5, 3 * n)
    words = {"".join(syllables[p[:k]]) for p, k in zip(picks, lengths, strict=True)}
    words = np.array(sorted(words))[rng.permutation(len(words))][:n]
    p = 1 / (np.arange(len(words)) + 2.7)
    return words, p / p.sum()


def build_tokenizer(workdir):
    """The LLaMA-like 32k BPE (cached in workdir/tokenizer)."""
    import numpy as np
    import transformers

    path = workdir / "tokenizer"
    if (path / "tokenizer.json").is_file():
        return transformers.PreTrainedTokenizerFast.from_pretrained(path)
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    rng = np.random.default_rng(0)
    words, p = lexicon(rng)
    text = words[rng.choice(len(words), 3_000_000, p=p)]
    lines = [" ".join(text[i : i + 15]).capitalize() + "." for i in range(0, len(text), 15)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=32_000, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )  # fmt: skip
    fast.save_pretrained(path)
    return fast


def photo_like(h: int, w: int, seed: int):
    """Smooth colour fields plus sensor-like noise, so JPEG and resizes do real work."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 3, 3)
    rgb = np.stack([np.sin(7 * x + phase[0]) + np.cos(3 * y), np.sin(5 * y + phase[1]),
                    np.cos(4 * (x - y) + phase[2])], -1)  # fmt: skip
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(((rgb + 2) * 60 + noise).clip(0, 255).astype(np.uint8))


def conversation(rng, words, p, tokenizer, target_tokens: int) -> list[dict]:
    """Rounds of question + answer (about 1:5) while the text stays within ~target_tokens."""

    def sentence(n):
        return " ".join(words[rng.choice(len(words), n, p=p)]).capitalize()

    turns, count = [], 40  # the template's system prompt and roles
    while True:
        q = sentence(int(rng.integers(8, 16))) + "?"
        a = ". ".join(sentence(int(rng.integers(8, 14))) for _ in range(5)) + "."
        n = len(tokenizer.encode(q + " " + a, add_special_tokens=False)) + 8
        if turns and count + n > target_tokens:
            break
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        count += n
    turns[0]["value"] = "<image>\n" + turns[0]["value"]
    return turns


def build_data(workdir, name, tokenizer, *, size, num_images, num_records, target_tokens):
    """JSON + JPEGs -> `llava-jax data build` shards in workdir/name/shards (cached)."""
    import io
    import json

    import numpy as np

    from llava_jax.data.build import build_shards

    out = workdir / name / "shards"
    if (out / "manifest.json").is_file():
        return out
    root = workdir / name / "images"
    root.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(num_images):
        buf = io.BytesIO()
        photo_like(h, w, seed=i).save(buf, "JPEG", quality=90)
        (root / f"{i}.jpg").write_bytes(buf.getvalue())
    rng = np.random.default_rng(1)
    words, p = lexicon(np.random.default_rng(0))
    records = [
        {"id": f"{name}_{k}", "image": f"{k % num_images}.jpg",
         "conversations": conversation(rng, words, p, tokenizer, target_tokens)}
        for k in range(num_records)
    ]  # fmt: skip
    (workdir / name / "data.json").write_text(json.dumps(records))
    build_shards(str(workdir / name / "data.json"), str(root), out, num_shards=4)
    return out


# -- the two cases ------------------------------------------------------------------------------


def case_config(name, tokenizer, ov_max_views: int = 37):
    """(LlavaConfig, ImageProcessorConfig, template, HF processor, batch, max_len, max_views)."""
    import transformers

    from llava_jax.config import LlavaConfig
    from llava_jax.media.processor_config import ImageProcessorConfig

    image_id, video_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>"))
    if name == "llava15":
        cfg = LlavaConfig.llava15_7b().replace(image_token_id=image_id)
        image_cfg = ImageProcessorConfig.from_hf(HF_LLAVA, "llava")
        hf = transformers.LlavaProcessor(
            image_processor=transformers.LlavaImageProcessorPil(**HF_LLAVA),
            tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )  # fmt: skip
        return cfg, image_cfg, "vicuna_v1", hf, 16, 2048, 1
    cfg = LlavaConfig.onevision_qwen2("7b").replace(image_token_id=image_id,
                                                    video_token_id=video_id)  # fmt: skip
    image_cfg = ImageProcessorConfig.from_hf(
        {**HF_ONEVISION, "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints]},
        "llava_onevision",
    )
    hf_image = transformers.LlavaOnevisionImageProcessorPil(
        **HF_ONEVISION, image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints]
    )
    hf = OnevisionProcessor(hf_image, tokenizer)
    return cfg, image_cfg, "qwen_1_5", hf, 4, 8192, ov_max_views


class OnevisionProcessor:
    """`LlavaOnevisionProcessor.__call__` for one image and one text, without its video
    processor (which needs torchvision): the image processor, transformers' own count of
    the image's tokens (`_get_number_of_features`), the text's `<image>` expanded to it, and
    the tokenizer."""

    def __init__(self, image_processor, tokenizer):
        import transformers

        counter = object.__new__(transformers.LlavaOnevisionProcessor)  # no video processor
        counter.image_processor, counter.num_image_tokens = image_processor, 729
        counter.vision_aspect_ratio = "anyres_max_9"
        self.counter, self.image_processor, self.tokenizer = counter, image_processor, tokenizer

    def __call__(self, images, text, return_tensors, **text_kwargs):
        out = dict(self.image_processor(images=images, return_tensors=return_tensors))
        orig_h, orig_w = out["image_sizes"][0]
        h, w = out["pixel_values"][0][0].shape[-2:]
        n = self.counter._get_number_of_features(int(orig_h), int(orig_w), h, w)
        text = [t.replace("<image>", "<image>" * n) for t in text]
        out.update(self.tokenizer(text, return_tensors=return_tensors, **text_kwargs))
        return out


class Ours:
    """The llava-jax loader over the shards, batches put onto the mesh.

    With num_workers=0, Grain still reads and transforms in its 16 prefetch threads
    (`ReadOptions`); pinned to one core they share it. An epoch is timed from the loader's
    creation to its last batch, so all of that work falls inside the timed window.
    """

    def __init__(self, shards_dir, case, tokenizer, mesh):
        from llava_jax.data.batching import BatchShape
        from llava_jax.data.sources import open_source
        from llava_jax.data.transforms import SampleTransform

        cfg, image_cfg, template, _, batch, max_len, max_views = case
        self.transform = SampleTransform(cfg, image_cfg, tokenizer, template, max_len=max_len,
                                         max_views=max_views)  # fmt: skip
        self.shape = BatchShape.for_model(cfg, batch, max_len, max_views, max_len)
        self.source, self.cfg, self.mesh = open_source(str(shards_dir)), cfg, mesh

    def epoch(self) -> int:
        from llava_jax.data import loader
        from llava_jax.data.schema import BATCH_FIELDS
        from llava_jax.sharding import shard_batch

        it = loader.make_loader(self.source, self.transform, self.shape, self.cfg, seed=0,
                                num_epochs=1, num_workers=0, process_index=0,
                                process_count=1)  # fmt: skip
        samples = 0
        for host in it:
            for a in shard_batch(host, self.mesh, BATCH_FIELDS).values():
                a.block_until_ready()
            samples += host["num_samples"]
        return samples


class Transformers:
    """transformers' processor on the same records, padded into the same batch shapes."""

    def __init__(self, shards_dir, case, tokenizer, mesh):
        import jax

        from llava_jax.data import shards
        from llava_jax.data.templates import get_template

        cfg, image_cfg, template, self.proc, self.size, self.max_len, self.max_views = case
        self.records = shards.ShardRecords(shards_dir)
        self.template = get_template(template)
        self.tokenizer, self.image_id, self.mesh = tokenizer, cfg.image_token_id, mesh
        self.s = image_cfg.view_size
        spec = jax.sharding.PartitionSpec(("data",))
        self.sharding = jax.sharding.NamedSharding(mesh, spec)
        self.next = 0

    def sample(self, record):
        """(input_ids int64[L], labels mask bool[L], pixel_values float32[V, 3, S, S])."""
        import io

        import numpy as np
        from PIL import Image, ImageOps

        from llava_jax.data.templates import render_spans
        from llava_jax.data.transforms import parse_conversation

        image = Image.open(io.BytesIO(record.images[0]))
        image = ImageOps.exif_transpose(image).convert("RGB")
        spans = render_spans(self.template, parse_conversation(record.conversations))
        text = "".join(t for t, _ in spans)
        out = self.proc(images=[image], text=[text], return_tensors="np",
                        return_offsets_mapping=True)  # fmt: skip
        ids = out["input_ids"][0]
        # Trained character ranges, moved past the expanded image tokens (all in turn 1).
        n_image = int((ids == self.image_id).sum())
        shift = (n_image - 1) * len("<image>")
        bounds, pos = [], 0
        for t, trained in spans:
            if trained:
                bounds.append((pos + shift, pos + len(t) + shift))
            pos += len(t)
        starts = out["offset_mapping"][0][:, 0]
        mask = np.zeros(len(ids), bool)
        for lo, hi in bounds:
            mask |= (starts >= lo) & (starts < hi)
        mask &= ids != self.image_id
        pixels = out["pixel_values"][0]
        return ids, mask, pixels.reshape(-1, *pixels.shape[-3:])

    def epoch(self) -> int:
        return sum(self.batch() for _ in range(len(self.records) // self.size))

    def batch(self) -> int:
        import jax
        import numpy as np

        b, t, v, s = self.size, self.max_len, self.max_views, self.s
        arrays = {
            "input_ids": np.zeros((b, t), np.int32),
            "labels": np.full((b, t), -100, np.int32),
            "attention_mask": np.zeros((b, t), np.int32),
            "pixel_values": np.zeros((b, v, 3, s, s), np.float32),
            "view_mask": np.zeros((b, v), bool),
        }
        for row in range(b):
            record = self.records[self.next % len(self.records)]
            self.next += 1
            ids, mask, pixels = self.sample(record)
            n = len(ids)
            arrays["input_ids"][row, :n] = ids
            arrays["labels"][row, : n - 1] = np.where(mask[1:], ids[1:], -100)
            arrays["attention_mask"][row, :n] = 1
            arrays["pixel_values"][row, : len(pixels)] = pixels
            arrays["view_mask"][row, : len(pixels)] = True
        for a in arrays.values():
            jax.make_array_from_process_local_data(self.sharding, a).block_until_ready()
        return b


def check_same_work(ours: Ours, hf: Transformers) -> str:
    """One record through both: the same token ids, pixels and trained tokens."""
    import numpy as np

    record = hf.records[0]
    ex = ours.transform(record)
    ids, mask, pixels = hf.sample(record)
    views = ex.views.transpose(0, 3, 1, 2)
    same_ids = np.array_equal(ex.input_ids, ids)
    same_mask = np.array_equal(ex.trained, mask)
    same_pixels = views.shape == pixels.shape and np.array_equal(views, pixels)
    assert same_pixels, f"pixels differ: {views.shape} vs {pixels.shape}"
    assert same_ids and same_mask, (
        f"ids equal {same_ids} ({len(ex.input_ids)} vs {len(ids)}), mask equal {same_mask}"
    )
    text = int((~np.isin(ex.input_ids, [ours.transform.cfg.image_token_id])).sum())
    return f"{len(ex.input_ids)} tokens ({text} text), {len(views)} views, identical"


def timed(side) -> tuple[int, float, float]:
    """(samples, wall s, CPU s of this process, all threads) of one epoch."""
    wall, cpu = time.perf_counter(), time.process_time()
    samples = side.epoch()
    return samples, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/llava_jax_data_bench")
    parser.add_argument("--cpu", type=int, default=os.cpu_count() - 1, help="core to pin to")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="llava15,onevision")
    parser.add_argument("--ov-max-views", type=int, default=37, help="OneVision views per row")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})  # before jax starts its threads: one core for all

    from pathlib import Path

    import jax
    import numpy as np
    import PIL
    import transformers

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    tokenizer = build_tokenizer(workdir)
    data = {
        "llava15": dict(size=(640, 480), num_images=32, num_records=128, target_tokens=600),
        "onevision": dict(size=(1920, 1080), num_images=8, num_records=32, target_tokens=600),
    }
    print(
        f"{platform.processor() or platform.machine()}, pinned to CPU {args.cpu} of "
        f"{os.cpu_count()}; load average {os.getloadavg()[0]:.1f} at start; jax "
        f"{jax.__version__} ({len(jax.devices())} CPU devices), transformers "
        f"{transformers.__version__}, Pillow {PIL.__version__}; tokenizer vocab {len(tokenizer)}"
    )
    rows = []
    for name in args.cases.split(","):
        shards_dir = build_data(workdir, name, tokenizer, **data[name])
        case = case_config(name, tokenizer, args.ov_max_views)
        ours = Ours(shards_dir, case, tokenizer, mesh)
        hf = Transformers(shards_dir, case, tokenizer, mesh)
        print(f"{name}: one sample: {check_same_work(ours, hf)}")
        hf.batch()  # warm-up: imports, caches
        results = {"ours": [], "hf": []}
        for _ in range(args.repeats):  # interleaved: machine noise hits both alike
            results["hf"].append(timed(hf))
            results["ours"].append(timed(ours))
        per = {
            side: (
                statistics.median(n / w for n, w, _ in runs),
                statistics.median(n / c for n, _, c in runs),
            )
            for side, runs in results.items()
        }
        rows.append((name, per))
        print(f"{name}: raw (samples, wall s, cpu s): {results}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print("| Case | transformers samples/s (wall / CPU) | llava-jax samples/s (wall / CPU) "
          "| Speed-up (wall / CPU) |")  # fmt: skip
    print("|---|---:|---:|---:|")
    for name, per in rows:
        (hw, hc), (ow, oc) = per["hf"], per["ours"]
        print(f"| {name} | {hw:.1f} / {hc:.1f} | {ow:.1f} / {oc:.1f} | "
              f"{ow / hw:.2f}x / {oc / hc:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
