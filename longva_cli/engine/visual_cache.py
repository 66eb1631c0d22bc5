"""Visual embeddings kept for reuse: in memory (a server's recent media) and on disk.

Decoding and encoding a long video costs far more than reading its embeddings back, so the
second `longva ask` about a video, a follow-up request to `longva serve` and every V-NIAH
run on the same haystack skip both. An entry is keyed by the media's content (the SHA-256 of
the whole file, not its name, date or samples of it), the checkpoint, the dtype and the
preprocessing, so a stale entry or another file's cannot be read by mistake.

On disk an entry is a folder named by the SHA-256 of its key, holding `key.json` (the key) and
blocks of consecutive frames (`frames-<start>-<stop>.safetensors`, [stop - start, 144, d], each
with the SHA-256 of its tensor in its metadata), written atomically, so a killed run keeps every
finished block and a longer haystack only adds the missing frames. A block whose checksum does
not match (a bad disk, an edit) is deleted and computed again. The least recently used entries
are deleted once the folder holds more than `max_bytes` (the entry in use is always kept); only
folders the cache wrote (a digest name whose `key.json` hashes to it) are ever deleted, so a
`--cache-dir` pointed at a folder of other things loses none of them.

Hashing reads the whole file once (far less work than decoding it); the hash is remembered on
disk by the file's path, inode, size and change times, so a second `ask` about a 10 GB video
does not read it again, and any change to the file (which moves its ctime) misses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from longva_cli.checks import env_number

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_GB = 20.0  # disk budget unless $LONGVA_CACHE_MAX_GB says otherwise
KEY_FILE = "key.json"
HASHES = "hashes"  # remembered content hashes, one small file each
MAX_REMEMBERED_HASHES = 4096
# Earlier releases named entries by the first 24 hex digits of the key's digest; they are still evicted.
ENTRY_NAME = re.compile(r"[0-9a-f]{64}|[0-9a-f]{24}")
BLOCK = re.compile(r"frames-(\d+)-(\d+)\.safetensors")
PARTIAL = re.compile(r"\.partial-(\d+)-\d+\.safetensors")
READ_CHUNK = 1 << 20
# A file changed within this long of its hash may have changed in the same timestamp tick as the
# hash was taken (coarse filesystem clocks): such a hash is used once, not remembered.
SETTLE_NS = 5 * 10**9


class DamagedEntry(Exception):
    """A cache block failed its checksum or could not be read; it was deleted."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "longva" / "visual"


def default_max_bytes() -> int:
    gb = env_number("LONGVA_CACHE_MAX_GB", DEFAULT_MAX_GB, meaning="the visual cache's disk budget in GiB", above=0)
    return int(gb * 2**30)


def content_hash(path: Path) -> str:
    """The SHA-256 of a file's whole content, in hex."""
    digest = hashlib.sha256()
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def disk_cache(folder: Path | None = None, enabled: bool = True) -> "VisualCache | None":
    """The on-disk cache of `ask`, `chat` and `eval` (`--cache-dir`, `--no-cache`)."""
    return VisualCache(folder or default_cache_dir()) if enabled else None


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def tensor_digest(tensor: "torch.Tensor") -> str:
    """SHA-256 of a CPU tensor's dtype, shape and bytes: a block's checksum."""
    import torch

    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def is_entry(folder: Path) -> bool:
    """Whether `folder` is a cache entry: a real folder named by the digest of the key in its key.json."""
    if folder.is_symlink() or not folder.is_dir() or not ENTRY_NAME.fullmatch(folder.name):
        return False
    try:
        key = json.loads((folder / KEY_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(key, dict) and key_digest(key)[: len(folder.name)] == folder.name


def writer_is_gone(partial: Path) -> bool:
    """Whether the process that was writing `.partial-<pid>-...` no longer runs (a crash left it)."""
    match = PARTIAL.fullmatch(partial.name)
    if not match:
        return False
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


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
        while stop in found and found[stop][1] > stop:
            chain.append(found[stop])
            stop = found[stop][1]
        return chain

    def stored(self) -> int:
        """Frames (or crops) stored from the first on."""
        blocks = self.blocks()
        return blocks[-1][1] if blocks else 0

    def append(self, start: int, embeds: "torch.Tensor") -> None:
        """Store frames start .. start + len(embeds) ([n, 144, d]) with their checksum; atomic, so
        readers see whole blocks, and a failed write (a full disk) leaves no partial file."""
        from safetensors.torch import save_file

        from longva_cli.engine.runs import write_atomic

        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / KEY_FILE).is_file():
            write_atomic(self.folder / KEY_FILE, json.dumps(self.key, indent=2, sort_keys=True) + "\n")
        stop = start + len(embeds)
        tensor = embeds.detach().cpu().contiguous()
        temporary = self.folder / f".partial-{os.getpid()}-{start:06d}.safetensors"
        try:
            save_file({"embeds": tensor}, str(temporary), metadata={"sha256": tensor_digest(tensor)})
            os.replace(temporary, self.folder / f"frames-{start:06d}-{stop:06d}.safetensors")
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def read_block(self, file: Path) -> "torch.Tensor":
        """A block's embeddings on the CPU, checked against its checksum; a damaged block is
        deleted and DamagedEntry raised."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                expected = (handle.metadata() or {}).get("sha256")
                embeds = handle.get_tensor("embeds")
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError, KeyError) as err:
            problem = f"cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        else:
            if expected == tensor_digest(embeds):
                return embeds
            problem = "does not match its checksum" if expected else "has no checksum"
        try:
            file.unlink(missing_ok=True)
            done = "it was deleted"
        except OSError:  # a read-only cache: the block stays, and is skipped each time
            done = "it is skipped"
        raise DamagedEntry(f"the visual cache block {file} {problem}; {done} and will be computed again")

    def load(self, count: int, device: "torch.device | str") -> "torch.Tensor | None":
        """The first `count` frames' embeddings [count, 144, d], or None if fewer are stored (or
        a block was deleted meanwhile); DamagedEntry when a block fails its checksum."""
        import torch

        parts, have = [], 0
        try:
            for _, stop, file in self.blocks():
                if have >= count:
                    break
                parts.append(self.read_block(file))
                have = stop
        except FileNotFoundError:
            return None
        if have < count:
            return None
        try:
            os.utime(self.folder)  # recently used: evicted last
        except OSError:  # a read-only cache is still read
            pass
        return torch.cat(parts)[:count].to(device)

    def verify(self, count: int) -> list[str]:
        """Check the blocks holding the first `count` frames; the damaged ones are deleted and
        described (one line each), so the next pass computes them again."""
        problems = []
        for start, _, file in self.blocks():
            if start >= count:
                break
            try:
                self.read_block(file)
            except DamagedEntry as err:
                problems.append(str(err))
            except FileNotFoundError:
                pass
        return problems


class VisualCache:
    """Embeddings by key: an in-memory LRU (`memory_bytes`) in front of an optional disk folder.

    The disk budget ($LONGVA_CACHE_MAX_GB) is read and checked here, when a folder is given, so a
    bad value is refused before any model loads.
    """

    def __init__(self, folder: Path | None = None, max_bytes: int | None = None, memory_bytes: int = 0) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.max_bytes = (default_max_bytes() if self.folder is not None else 0) if max_bytes is None else max_bytes
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, object] = OrderedDict()
        self._hashes: dict[str, str] = {}

    def entry(self, key: dict) -> CacheEntry | None:
        """The disk entry of `key` (None without a folder)."""
        if self.folder is None:
            return None
        return CacheEntry(self.folder / key_digest(key), key)

    def file_hash(self, path: Path) -> str:
        """`content_hash(path)`, remembered (in memory, and on disk with a folder) by the file's
        path, device, inode, size, mtime and ctime: any write to the file, or a file put in its
        place, changes one of them, and a file changed in the last few seconds is hashed anew."""
        path = Path(path)
        before = path.stat()
        identity = (str(path.resolve()), before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns)
        memo = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
        if memo in self._hashes:
            return self._hashes[memo]
        memo_file = self.folder / HASHES / memo if self.folder is not None else None
        try:
            remembered = memo_file.read_text(encoding="ascii").strip() if memo_file is not None else ""
        except (OSError, UnicodeDecodeError):
            remembered = ""
        if re.fullmatch(r"[0-9a-f]{64}", remembered):
            self._keep_hash(memo, remembered)
            return remembered
        started = time.time_ns()
        digest = content_hash(path)
        after = path.stat()
        unchanged = (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) == identity[2:]
        if unchanged and started - max(after.st_mtime_ns, after.st_ctime_ns) > SETTLE_NS:
            self._keep_hash(memo, digest)
            if memo_file is not None:
                try:
                    from longva_cli.engine.runs import write_atomic

                    memo_file.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(memo_file, digest + "\n")
                except OSError:  # not remembering costs a rehash next time, nothing else
                    pass
        return digest

    def _keep_hash(self, memo: str, digest: str) -> None:
        """Remember a file's hash in memory; a server that sees many files keeps the latest few thousand."""
        self._hashes[memo] = digest
        if len(self._hashes) > MAX_REMEMBERED_HASHES:
            del self._hashes[next(iter(self._hashes))]

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

    def entries(self) -> list[Path]:
        """The cache's own entry folders, least recently used first (nothing else in the folder)."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.iterdir() if is_entry(p)), key=lambda p: p.stat().st_mtime)

    def evict(self, keep: CacheEntry | None = None) -> None:
        """Delete partial blocks of crashed writers, then least recently used entries until the
        entries fit `max_bytes`, then the oldest remembered hashes beyond a few thousand."""
        entries = self.entries()
        sizes = {}
        for folder in entries:
            for partial in folder.glob(".partial-*"):
                if writer_is_gone(partial):
                    partial.unlink(missing_ok=True)
            sizes[folder] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        total = sum(sizes.values())
        for folder in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and folder == keep.folder:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
        hashes = self.folder / HASHES if self.folder is not None else None
        if hashes is not None and hashes.is_dir() and not hashes.is_symlink():
            memos = sorted((p for p in hashes.iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name) and p.is_file()), key=lambda p: p.stat().st_mtime)
            for memo in memos[: max(len(memos) - MAX_REMEMBERED_HASHES, 0)]:
                memo.unlink(missing_ok=True)
