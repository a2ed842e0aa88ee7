"""Webdataset-layout tar shards of whole identities, a manifest, and crash-safe writing.

A shard ``shard-000000.tar`` holds the samples of a fixed range of identities; each sample is the
members ``<key>.png`` (the image), ``<key>.json`` (its record), ``<key>.emb.npy`` (the identity
embedding, float32) and ``<key>.crop.png`` (the aligned 224 px face crop), with
``key = id000012-oil-painting-03`` (webdataset keys hold no dots). The tar is written
deterministically (fixed member order, times and owners) to a temporary name, fsynced and renamed;
then one JSON line is appended to ``manifest.jsonl`` under an exclusive lock (several processes
append): the shard's name, sha256, identities, sample count, kept/rejected counts per reason, the
face backend and the generation settings.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

MANIFEST = "manifest.jsonl"
EXTENSIONS = ("png", "json", "emb.npy", "crop.png")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shard_identities(index: int, per_shard: int, n_identities: int) -> range:
    """The identities of shard ``index``: [index·P, (index+1)·P) ∩ [0, N)."""
    return range(index * per_shard, min((index + 1) * per_shard, n_identities))


def n_shards(n_identities: int, per_shard: int) -> int:
    return -(-n_identities // per_shard)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Sample:
    """One kept image and what is stored with it."""

    key: str
    image: Image.Image
    record: dict[str, Any]  # identity, prompts, template, seed, stylized, box, landmarks, score, backend…
    embedding: np.ndarray  # (D,) float32
    crop: Image.Image  # aligned 224 px face crop


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[Sample]) -> str:
    """Write ``samples`` as the tar ``path`` (temporary name, fsync, rename); returns its sha256."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                _add(tar, f"{s.key}.png", _png(s.image))
                _add(tar, f"{s.key}.json", json.dumps(s.record, sort_keys=True).encode())
                _add(tar, f"{s.key}.emb.npy", _npy(s.embedding))
                _add(tar, f"{s.key}.crop.png", _png(s.crop))
        f.flush()
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return digest


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _entry(line: bytes) -> dict[str, Any] | None:
    """A manifest line's entry, or None when it is not a JSON object naming a shard."""
    try:
        entry = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return entry if isinstance(entry, dict) and "shard" in entry else None


def manifest_entries(data: bytes) -> list[dict[str, Any]]:
    """The entries of a manifest's bytes, in order. Only newline-terminated lines count: an
    unterminated last line is a write cut short by a kill (torn), and unparsable lines are skipped."""
    lines = data.split(b"\n")[:-1]  # the piece after the last newline is torn (or empty)
    return [e for e in map(_entry, lines) if e is not None]


def torn_tail_start(data: bytes) -> int:
    """Where the valid manifest ``data`` ends: the length of ``data`` without an unterminated last
    line or a last line that does not parse (both left by a run killed while appending)."""
    end = data.rfind(b"\n") + 1
    if end < len(data):  # no newline after the last line
        return end
    start = data.rfind(b"\n", 0, max(end - 1, 0)) + 1
    return start if end and _entry(data[start:end - 1]) is None else end


def append_manifest(folder: Path, entry: dict[str, Any]) -> None:
    """One line in ``manifest.jsonl``, appended under an exclusive lock and fsynced.

    A run killed while appending leaves a torn last line; appending onto it would merge it with
    this entry into one unparsable line and lose both. So, under the lock, a torn tail (see
    :func:`torn_tail_start`) is cut first; its shard is not listed (:func:`read_manifest` skips it
    too), so it is remade or re-listed by the run that owns it."""
    with (folder / MANIFEST).open("a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            data = f.read()
            keep = torn_tail_start(data)
            if keep < len(data):
                f.truncate(keep)
            f.write((json.dumps(entry, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """shard name → its latest manifest entry; a torn (partial or unterminated) line is ignored."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    return {entry["shard"]: entry for entry in manifest_entries(path.read_bytes())}


def shard_is_complete(folder: Path, name: str, manifest: dict[str, dict]) -> bool:
    """In the manifest, on disk, with the manifest's checksum."""
    entry, path = manifest.get(name), Path(folder) / name
    return entry is not None and path.is_file() and sha256_file(path) == entry.get("sha256")


def remove_stale_temporaries(folder: Path, names: set[str]) -> int:
    """Delete temporaries of ``names`` left by killed runs; returns how many."""
    n = 0
    for p in Path(folder).glob("shard-*.tar.tmp-*"):
        if p.name.split(".tmp-")[0] in names:
            p.unlink(missing_ok=True)
            n += 1
    return n


def iter_members(path: Path) -> Iterator[tuple[str, str, int, int]]:
    """(key, extension, data offset, size) of every file member of a tar, from its headers only."""
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            yield key, ext, info.offset_data, info.size
