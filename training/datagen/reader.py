"""Reading the shards: an index of every sample (tar headers only, once) and training pairs.

``ShardSamples`` lists the samples of one or more folders of shards (those in their manifests);
``PairDataset`` turns them into (reference, target) pairs of the same identity: the reference is a
plain photo, the target any other image of the identity, its prompt the compressed one. Reading is
lazy (seek + read of the members a pair needs). Corrupt members and face-less samples are skipped
and counted in ``skipped`` by reason, never fatal.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .shards import iter_members, read_manifest


@dataclass(frozen=True)
class SampleRef:
    """Where a sample's members are: shard path → extension → (offset, size)."""

    key: str
    shard: Path
    members: tuple[tuple[str, int, int], ...]

    def member(self, ext: str) -> tuple[int, int] | None:
        for e, off, size in self.members:
            if e == ext:
                return off, size
        return None


def _read(path: Path, span: tuple[int, int]) -> bytes:
    with path.open("rb") as f:
        f.seek(span[0])
        return f.read(span[1])


def counts_text(counts) -> str:
    """``{"corrupt": 2, "no_face": 1}`` as "corrupt 2, no_face 1" (zero counts left out; "none")."""
    items = [(k, v) for k, v in sorted(dict(counts).items()) if v]
    return ", ".join(f"{k} {v}" for k, v in items) if items else "none"


class ShardSamples:
    """Every complete sample of the shards listed in the folders' manifests, with its record."""

    REQUIRED = ("png", "json", "emb.npy", "crop.png")

    def __init__(self, folders: Sequence[str | Path]):
        self.skipped: Counter = Counter()
        self.samples: list[SampleRef] = []
        self.records: list[dict[str, Any]] = []
        for folder in (Path(f) for f in folders):
            if not folder.exists():
                raise FileNotFoundError(f"{folder} does not exist: pass a folder of training shards (the --output-dir "
                                        "of `python -m training datagen generate` or `sample`)")
            if folder.is_file():
                what = "one shard" if folder.name.endswith(".tar") else "a file"
                raise FileNotFoundError(f"{folder} is {what}, not a folder: pass the folder that holds manifest.jsonl "
                                        "and the shards")
            manifest = read_manifest(folder)
            if not manifest:
                hint = (" (the LCM-Lookahead authors' folder format: convert it first with "
                        "`python -m training datagen import-authors`)") if (folder / "metadata.json").is_file() else ""
                if (folder / "manifest.jsonl").is_file():
                    raise FileNotFoundError(f"{folder / 'manifest.jsonl'} lists no shard (empty, or not lines of "
                                            "JSON written by datagen); make the data again with datagen")
                raise FileNotFoundError(f"{folder} holds no manifest.jsonl of training shards{hint}")
            for name in sorted(manifest):
                path = folder / name
                if not path.is_file():
                    self.skipped["missing_shard"] += 1
                    continue
                self._index(path)

    def _index(self, path: Path) -> None:
        members: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
        try:
            for key, ext, off, size in iter_members(path):
                members[key].append((ext, off, size))
        except Exception:  # noqa: BLE001 - a truncated or corrupt tar: keep what was readable
            self.skipped["corrupt_shard"] += 1
        for key, parts in members.items():
            ref = SampleRef(key, path, tuple(parts))
            if any(ref.member(e) is None for e in self.REQUIRED):
                self.skipped["incomplete"] += 1
                continue
            try:
                record = json.loads(_read(path, ref.member("json")))
            except (ValueError, UnicodeDecodeError):
                self.skipped["corrupt"] += 1
                continue
            if not record.get("box") or not record.get("landmarks"):
                self.skipped["no_face"] += 1
                continue
            self.samples.append(ref)
            self.records.append(record)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int, ext: str = "png") -> Image.Image:
        ref = self.samples[i]
        img = Image.open(io.BytesIO(_read(ref.shard, ref.member(ext))))
        img.load()
        return img.convert("RGB")

    def embedding(self, i: int) -> np.ndarray:
        ref = self.samples[i]
        return np.load(io.BytesIO(_read(ref.shard, ref.member("emb.npy"))), allow_pickle=False)


class PairDataset:
    """(reference plain photo, another image of the same identity) pairs as ``PairSample``s.

    Pair j's target is sample j (every kept sample is a target once); its reference is a plain
    photo of the same identity other than the target, picked by a hash of the target's key, so the
    pairs are fixed for a given set of shards. A pair whose members turn out to be corrupt is
    replaced by the next valid pair and counted in ``skipped["corrupt"]``.
    """

    def __init__(self, folders: Sequence[str | Path]):
        self.samples = ShardSamples(folders)
        self.skipped = self.samples.skipped
        by_identity: dict[Any, list[int]] = defaultdict(list)
        for i, r in enumerate(self.samples.records):
            if not r.get("stylized"):
                by_identity[(str(self.samples.samples[i].shard.parent), r["identity"])].append(i)
        self.pairs: list[tuple[int, int]] = []
        for j, r in enumerate(self.samples.records):
            refs = [i for i in by_identity[(str(self.samples.samples[j].shard.parent), r["identity"])] if i != j]
            if not refs:
                self.skipped["no_reference"] += 1
                continue
            h = int(hashlib.sha256(r["key"].encode()).hexdigest(), 16)
            self.pairs.append((refs[h % len(refs)], j))
        if not self.pairs:
            where = ", ".join(map(str, folders))
            unread = {k: v for k, v in self.skipped.items() if k in ("missing_shard", "corrupt_shard", "incomplete", "corrupt")}
            if unread and not self.samples.records:
                raise ValueError(f"no training pairs in {where}: the shards could not be read ({counts_text(unread)}); "
                                 "make the data again with datagen, or check `python -m training datagen inspect`")
            raise ValueError(f"no training pairs in {where}: every identity needs two plain photos "
                             "(a folder rendered by the tiny preset keeps none: its random weights draw no faces; "
                             "`python -m training datagen sample --output-dir D` makes a small real-photo set)")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        from training.data import PairSample

        for attempt in range(len(self.pairs)):
            ref, tgt = self.pairs[(index + attempt) % len(self.pairs)]
            try:
                r_rec, t_rec = self.samples.records[ref], self.samples.records[tgt]
                return PairSample(
                    reference=self.samples.image(ref), reference_box=tuple(r_rec["box"]),
                    reference_crop=self.samples.image(ref, "crop.png"),
                    reference_embedding=self.samples.embedding(ref), target=self.samples.image(tgt),
                    prompt=t_rec["compressed_prompt"], key=f"{r_rec['key']}>{t_rec['key']}",
                    reference_prompt=r_rec["compressed_prompt"])
            except (OSError, ValueError, SyntaxError):
                self.skipped["corrupt"] += 1
        shards = sorted({str(self.samples.samples[i].shard) for pair in self.pairs for i in pair})
        raise ValueError(f"every training pair is corrupt: no image of {', '.join(shards[:3])}"
                         f"{' and more' if len(shards) > 3 else ''} decodes; make the data again with datagen, or "
                         "check it with `python -m training datagen inspect`")
