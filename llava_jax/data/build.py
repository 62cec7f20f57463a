"""`build_shards`: pack a source's records and their media files into ArrayRecord shards.

Each record's image and video files are checked (inside the image root, present, a format
on the allow-list by its magic bytes) and embedded; a record that fails is skipped, counted
by reason in the manifest and listed in `skipped.jsonl`, never fatal. Only what embedding
needs is checked here: a record that is not an object or whose `conversations` is not a list
is skipped as `malformed_record`; roles, placeholders and lengths are the sample transform's
to check at training time.

Shard k holds a contiguous run of the source's records, so reading the shards in order
gives the source order; shards are written in parallel threads (the work is file I/O). The
output appears all at once: everything is written to a sibling temporary directory that is
renamed to `out` when complete.

`out`, the source and the image root may be local or `gs://` (etils.epath). ArrayRecord
writes local files only, so a shard bound for a bucket is written to a local temporary file
and copied up; on GCS the final rename is a copy of each object (GCS has no directories).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import tempfile
import threading
import time
import uuid

from etils import epath

from llava_jax.data import shards
from llava_jax.data.schema import RawRecord, SkipSample, conversations_problem
from llava_jax.data.sources import is_remote, open_source, resolve_media

RECORDS_PER_SHARD = 50_000  # the default shard count aims at this

# Magic bytes of the accepted formats: (offset, bytes) that must all match.
IMAGE_MAGIC = {
    "JPEG": ((0, b"\xff\xd8\xff"),),
    "PNG": ((0, b"\x89PNG\r\n\x1a\n"),),
    "GIF": ((0, b"GIF8"),),
    "WEBP": ((0, b"RIFF"), (8, b"WEBP")),
    "BMP": ((0, b"BM"),),
}
VIDEO_MAGIC = {
    "MP4/MOV": ((4, b"ftyp"),),  # ISO base media: MP4, M4V, MOV, 3GP
    "QuickTime": ((4, b"moov"),),
    "Matroska/WebM": ((0, b"\x1a\x45\xdf\xa3"),),
    "AVI": ((0, b"RIFF"), (8, b"AVI ")),
    "MPEG-PS": ((0, b"\x00\x00\x01\xba"),),
    "MPEG-TS": ((0, b"\x47"), (188, b"\x47")),
    "FLV": ((0, b"FLV"),),
    "Ogg": ((0, b"OggS"),),
    "GIF": IMAGE_MAGIC["GIF"],  # animated GIF and WebP decode as videos too
    "WEBP": IMAGE_MAGIC["WEBP"],
}


class BuildError(ValueError):
    """A build that cannot start (output in the way); the message is one line."""


@dataclasses.dataclass(frozen=True)
class BuildSummary:
    """What a build wrote: records per shard, and skipped records counted by reason."""

    out: epath.Path
    shard_counts: tuple[int, ...]
    skipped: dict[str, int]
    seconds: float

    @property
    def num_records(self) -> int:
        return sum(self.shard_counts)

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        return (
            f"{self.num_records} records in {len(self.shard_counts)} shards -> {self.out}; "
            f"skipped {skipped}{f' ({reasons})' if reasons else ''} ({self.seconds:.1f} s)"
        )


def media_format(data: bytes, kind: str) -> str | None:
    """The format `data` is by its magic bytes, among those of `kind` (image / video)."""
    table = IMAGE_MAGIC if kind == "image" else VIDEO_MAGIC
    for name, checks in table.items():
        if all(data[o : o + len(m)] == m for o, m in checks):
            return name
    return None


def build_shards(
    spec: str,
    image_root: str | None,
    out: epath.PathLike,
    *,
    num_shards: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    seed: int = 0,
) -> BuildSummary:
    """Writes the records of `open_source(spec, image_root, seed=seed)` to `out`.

    Args:
      spec: a JSON / JSONL / YAML source (any `open_source` spec works).
      image_root: where the records' relative media paths resolve.
      out: the directory to create; it must not exist or be empty, unless `overwrite` and it
        is an earlier build (its manifest is checked), which is then replaced.
      num_shards: default: one per `RECORDS_PER_SHARD` records, at least `workers`; never
        more than the records.
      workers: threads writing shards at once.

    Raises:
      BuildError: `out` is in the way.
      FileNotFoundError, ValueError: from `open_source`.
    """
    start = time.perf_counter()
    out = epath.Path(out)  # local or gs://
    _check_out(out, overwrite)
    source = open_source(spec, image_root, seed=seed)
    n = len(source)
    if num_shards is None:
        num_shards = max(workers, -(-n // RECORDS_PER_SHARD))
    if num_shards < 1 or workers < 1:
        raise BuildError(f"num_shards ({num_shards}) and workers ({workers}) must be >= 1")
    num_shards = max(1, min(num_shards, n))
    bounds = [n * k // num_shards for k in range(num_shards + 1)]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not tempfile.mkdtemp: its mode 0700 would outlive the rename
    stop = threading.Event()
    try:
        names = [shards.shard_name(k, num_shards) for k in range(num_shards)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            try:
                jobs = [
                    pool.submit(_write_shard, source, bounds[k : k + 2], tmp / name, stop)
                    for k, name in enumerate(names)
                ]
                results = [job.result() for job in jobs]
            finally:
                stop.set()  # on an error or Ctrl-C, the other shards stop at their next record
        skips = [s for _, shard_skips in results for s in shard_skips]
        counts = tuple(count for count, _ in results)
        skipped = dict(collections.Counter(reason for _, reason, _ in skips))
        with (tmp / shards.SKIPPED).open("w", encoding="utf-8") as f:
            for record_id, reason, detail in skips:
                line = {"id": record_id, "reason": reason, "detail": detail}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        manifest = {
            "format": shards.FORMAT,
            "version": shards.VERSION,
            "source": spec,
            "image_root": None if image_root is None else str(image_root),
            "num_records": sum(counts),
            "shards": [{"file": f, "num_records": c} for f, c in zip(names, counts, strict=True)],
            "num_skipped": len(skips),
            "skipped": dict(sorted(skipped.items())),
            "skipped_records": shards.SKIPPED,
        }
        (tmp / shards.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(tmp, out)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return BuildSummary(out, counts, skipped, time.perf_counter() - start)


def _check_out(out: epath.Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise BuildError(f"--out {out}: exists and is not empty; refusing to overwrite")
    try:
        shards.read_manifest(out)
    except ValueError:
        raise BuildError(
            f"--out {out}: not an earlier `llava-jax data build` output; refusing to "
            "overwrite it, even with --overwrite"
        ) from None


def _replace(tmp: epath.Path, out: epath.Path) -> None:
    """Renames `tmp` to `out`; an earlier build at `out` is renamed aside, then deleted."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # fails rather than delete anything
        else:
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
    tmp.rename(out)
    if old is not None:
        old.rmtree()


def _remove_quietly(path: epath.Path) -> None:
    """Deletes a partial build; an error here must not hide the one that stopped it."""
    try:
        if path.exists():
            path.rmtree()
    except OSError:
        pass


def _write_shard(source, bounds: list[int], path: epath.Path, stop: threading.Event):
    """Writes records [lo, hi) to one shard; returns (count, [(id, reason, detail), ...])."""
    if is_remote(path):  # ArrayRecord writes local files: stage the shard, then copy it up
        with tempfile.TemporaryDirectory(prefix="llava-jax-shard-") as staging:
            local = epath.Path(staging) / path.name
            result = _write_shard(source, bounds, local, stop)
            local.copy(path)
        return result
    lo, hi = bounds
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(os.fspath(path), shards.WRITER_OPTIONS)
    count, skips = 0, []
    try:
        for index in range(lo, hi):
            if stop.is_set():
                raise RuntimeError("build stopped")  # the result is never used
            record = source[index]
            try:
                writer.write(shards.encode_record(_embed(record)))
                count += 1
            except SkipSample as e:
                skips.append((e.record_id, e.reason, e.detail))
    finally:
        writer.close()
    return count, skips


def _embed(record: RawRecord) -> RawRecord:
    """The record with each media file's bytes in place of its path, checked."""
    if not isinstance(record.conversations, list):
        raise SkipSample("malformed_record", conversations_problem(record.conversations), record.id)
    images = tuple(_read(ref, record, "image") for ref in record.images)
    videos = tuple(_read(ref, record, "video") for ref in record.videos)
    return dataclasses.replace(record, images=images, videos=videos, root=None)


def _read(ref, record: RawRecord, kind: str) -> bytes:
    media = resolve_media(ref, record.root, record.id)
    name = "<bytes>" if isinstance(media, bytes) else ref
    if not isinstance(media, bytes):
        try:
            media = media.read_bytes()
        except OSError as e:  # unreadable: permissions, an I/O error
            raise SkipSample("missing_file", f"{ref!r}: {e.strerror}", record.id) from None
    if media_format(media, kind) is None:
        reason = "corrupt_image" if kind == "image" else "bad_video"
        accepted = ", ".join(IMAGE_MAGIC if kind == "image" else VIDEO_MAGIC)
        raise SkipSample(reason, f"{name}: not a {kind} format we accept ({accepted})", record.id)
    return media
