"""Visual embeddings kept for reuse: in memory (a server's recent media) and on disk.

Decoding and encoding a long video costs far more than reading its embeddings back, so the
second `longva ask` about a video, a follow-up request to `longva serve` and every V-NIAH
run on the same haystack skip both. An entry is keyed by the media's content (not its name or
date), the checkpoint, the dtype and the preprocessing, so a stale entry cannot be read by
mistake.

On disk an entry is a folder of blocks of consecutive frames (`frames-<start>-<stop>.safetensors`,
[stop - start, 144, d]) written atomically, so a killed run keeps every finished block and a
longer haystack only adds the missing frames. The least recently used entries are deleted once
the folder holds more than `max_bytes` (the entry in use is always kept).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_GB = 20.0  # disk budget unless $LONGVA_CACHE_MAX_GB says otherwise
BLOCK = re.compile(r"frames-(\d+)-(\d+)\.safetensors")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "longva" / "visual"


def default_max_bytes() -> int:
    return int(float(os.environ.get("LONGVA_CACHE_MAX_GB", DEFAULT_MAX_GB)) * 2**30)


def content_hash(path: Path, samples: int = 16, block: int = 1 << 20) -> str:
    """A fingerprint of a (possibly many-GB) file: its size and 16 evenly spaced 1 MiB blocks."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= samples * block:
            digest.update(handle.read())
        else:
            for i in range(samples):
                handle.seek(i * (size - block) // (samples - 1))
                digest.update(handle.read(block))
    return digest.hexdigest()[:20]


def disk_cache(folder: Path | None = None, enabled: bool = True) -> "VisualCache | None":
    """The on-disk cache of `ask`, `chat` and `eval` (`--cache-dir`, `--no-cache`)."""
    return VisualCache(folder or default_cache_dir()) if enabled else None


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class CacheEntry:
    """One media item's embeddings on disk, as a chain of frame blocks from frame 0."""

    def __init__(self, folder: Path, key: dict) -> None:
        self.folder = folder
        self.key = key

    def blocks(self) -> list[tuple[int, int, Path]]:
        """Stored (start, stop, file) blocks that continue each other from frame 0."""
        found = {}
        for file in self.folder.glob("frames-*.safetensors"):
            match = BLOCK.fullmatch(file.name)
            if match:
                found[int(match[1])] = (int(match[1]), int(match[2]), file)
        chain, stop = [], 0
        while stop in found:
            chain.append(found[stop])
            stop = found[stop][1]
        return chain

    def stored(self) -> int:
        """Frames (or crops) stored from the first on."""
        blocks = self.blocks()
        return blocks[-1][1] if blocks else 0

    def append(self, start: int, embeds: "torch.Tensor") -> None:
        """Store frames start .. start + len(embeds) ([n, 144, d]); atomic, so readers see whole blocks."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.is_file():
            key_file.write_text(json.dumps(self.key, indent=2, sort_keys=True) + "\n")
        stop = start + len(embeds)
        temporary = self.folder / f".partial-{os.getpid()}-{start:06d}.safetensors"
        save_file({"embeds": embeds.detach().cpu().contiguous()}, str(temporary))
        os.replace(temporary, self.folder / f"frames-{start:06d}-{stop:06d}.safetensors")

    def load(self, count: int, device: "torch.device | str") -> "torch.Tensor | None":
        """The first `count` frames' embeddings [count, 144, d], or None if fewer are stored
        (or a block was deleted meanwhile)."""
        from safetensors.torch import load_file

        parts, have = [], 0
        try:
            for _, stop, file in self.blocks():
                if have >= count:
                    break
                parts.append(load_file(str(file), device=str(device))["embeds"])
                have = stop
        except (FileNotFoundError, OSError):
            return None
        if have < count:
            return None
        os.utime(self.folder)  # recently used: evicted last
        import torch

        return torch.cat(parts)[:count]


class VisualCache:
    """Embeddings by key: an in-memory LRU (`memory_bytes`) in front of an optional disk folder."""

    def __init__(self, folder: Path | None = None, max_bytes: int | None = None, memory_bytes: int = 0) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, object] = OrderedDict()

    def entry(self, key: dict) -> CacheEntry | None:
        """The disk entry of `key` (None without a folder)."""
        if self.folder is None:
            return None
        return CacheEntry(self.folder / key_digest(key), key)

    def remembered(self, key: dict):
        """A value kept in memory for `key`, or None."""
        digest = key_digest(key)
        if digest in self._memory:
            self._memory.move_to_end(digest)
            return self._memory[digest][0]
        return None

    def remember(self, key: dict, value, nbytes: int) -> None:
        """Keep `value` in memory, dropping the least recently used values beyond `memory_bytes`."""
        if self.memory_bytes <= 0 or nbytes > self.memory_bytes:
            return
        self._memory[key_digest(key)] = (value, nbytes)
        self._memory.move_to_end(key_digest(key))
        while sum(size for _, size in self._memory.values()) > self.memory_bytes:
            self._memory.popitem(last=False)

    def evict(self, keep: CacheEntry | None = None) -> None:
        """Delete least recently used disk entries until the folder fits `max_bytes`."""
        if self.folder is None or not self.folder.is_dir():
            return
        entries = sorted((p for p in self.folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        sizes = {p: sum(f.stat().st_size for f in p.glob("*") if f.is_file()) for p in entries}
        total = sum(sizes.values())
        for folder in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and folder == keep.folder:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
