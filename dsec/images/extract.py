"""Safe, single-pass extraction of one OCI layer tar into a directory usable as an overlay lower layer.

Why our own loop instead of `tarfile.extractall`: a layer is untrusted input. Every entry is checked so nothing
can be written outside the layer directory (`..`, absolute names, hard links out, writes through a symlink the
same tar planted), device nodes and oversized headers are refused, and OCI whiteouts are translated to what
overlayfs understands (`.wh.x` → 0/0 char device `x`; `.wh..wh..opq` → `trusted.overlay.opaque=y`). The same
pass hashes the compressed stream (blob digest), the uncompressed stream (diff_id) and tees the blob to disk.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dsec.errors import InvalidSpec
from dsec.images.digest import CHUNK, HashingReader

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
MAX_HEADER_BYTES = 1 << 20  # pax / GNU long-name headers are read into memory: cap them
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_GZIP_MAGIC = b"\x1f\x8b"


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses metadata headers larger than MAX_HEADER_BYTES before tarfile buffers them."""

    def _proc_member(self, tarfile_obj: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type in _META_TYPES and self.size > MAX_HEADER_BYTES:
            raise InvalidSpec(
                f"layer tar has a {self.size}-byte metadata header for {self.name!r} (limit {MAX_HEADER_BYTES}): rejected"
            )
        return super()._proc_member(tarfile_obj)  # type: ignore[misc]


class _Prefixed:
    """Puts back the bytes read to sniff the compression format."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self._head = head
        self._raw = raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            if len(data) < n:
                data += self._raw.read(n - len(data))
            return data
        return self._raw.read(n)


@dataclass(frozen=True)
class ExtractResult:
    blob_digest: str  # sha256 of the bytes as given (compressed or not)
    blob_size: int
    diff_id: str  # sha256 of the uncompressed tar
    unpacked_bytes: int
    compressed: bool


def _normalize(name: str, what: str) -> str:
    """Return the entry's path relative to the layer root, or raise InvalidSpec if it could escape."""
    if "\0" in name:
        raise InvalidSpec(f"layer tar {what} {name!r} contains a NUL byte: rejected")
    if name.startswith("/"):
        raise InvalidSpec(f"layer tar {what} {name!r} is absolute: rejected (entries must be relative to the layer root)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidSpec(f"layer tar {what} {name!r} contains '..': rejected (it would escape the layer)")
    return "/".join(parts)


class _LayerWriter:
    """Applies tar entries under `root`, tracking which parent directories are known to be real directories."""

    def __init__(self, root: Path, data_fd: int | None = None, data_start: int = 0) -> None:
        self.root = root
        self._data_fd = data_fd  # the uncompressed tar as a file region: contents are copied in the kernel from it
        self._data_start = data_start
        self._dirs: set[str] = {""}
        self._dir_times: list[tuple[str, float]] = []
        self.unpacked = 0

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else str(self.root)

    def _ensure_parent(self, rel: str) -> None:
        parent = rel.rpartition("/")[0]
        if parent in self._dirs:
            return
        walked = ""
        for part in parent.split("/"):
            walked = f"{walked}/{part}" if walked else part
            if walked in self._dirs:
                continue
            path = self._path(walked)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    raise InvalidSpec(
                        f"layer tar entry {rel!r} lies under {walked!r}, which this layer made a non-directory "
                        "(a symlink escape attempt): rejected"
                    )
            self._dirs.add(walked)

    def _clear(self, rel: str, keep_dir: bool) -> None:
        path = self._path(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            shutil.rmtree(path)
            self._dirs = {d for d in self._dirs if d != rel and not d.startswith(rel + "/")}
        else:
            os.unlink(path)

    def whiteout(self, rel: str) -> None:
        parent, _, base = rel.rpartition("/")
        self._ensure_parent(rel)
        if base == OPAQUE_MARKER:
            os.setxattr(self._path(parent), OPAQUE_XATTR, b"y")
            return
        target = f"{parent}/{base[len(WHITEOUT_PREFIX):]}" if parent else base[len(WHITEOUT_PREFIX):]
        _normalize(target, "whiteout")
        if not target or target.endswith("/") or base in (WHITEOUT_PREFIX, WHITEOUT_PREFIX + ".", WHITEOUT_PREFIX + ".."):
            raise InvalidSpec(f"layer tar has a malformed whiteout {rel!r}: rejected")
        self._clear(target, keep_dir=False)
        os.mknod(self._path(target), stat.S_IFCHR | 0o000, os.makedev(0, 0))

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str) -> None:
        if not rel:  # the layer root itself ("./"): only its metadata matters
            if member.isdir():
                self._meta(rel, member)
            return
        self._ensure_parent(rel)
        path = self._path(rel)
        if member.isdir():
            self._clear(rel, keep_dir=True)
            if not os.path.isdir(path):
                os.mkdir(path, 0o700)
            self._dirs.add(rel)
        else:
            self._clear(rel, keep_dir=False)
            if member.isreg():
                self._write_file(tar, member, path)
            elif member.issym():
                os.symlink(member.linkname, path)
            elif member.islnk():
                self._hardlink(member, rel, path)
                return  # a hard link shares the target's inode and metadata
            elif member.isfifo():
                os.mkfifo(path, 0o600)
            elif member.ischr() or member.isblk():
                raise InvalidSpec(f"layer tar entry {rel!r} is a device node: rejected (images may not carry devices)")
            else:
                raise InvalidSpec(f"layer tar entry {rel!r} has unsupported type {member.type!r}: rejected")
        self._meta(rel, member)

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as dst:
            if self._data_fd is not None and not member.issparse():
                _copy_range(self._data_fd, dst.fileno(), self._data_start + member.offset_data, member.size, member.name)
            else:
                src = tar.extractfile(member)
                assert src is not None
                shutil.copyfileobj(src, dst, CHUNK)
        self.unpacked += member.size

    def _hardlink(self, member: tarfile.TarInfo, rel: str, path: str) -> None:
        target_rel = _normalize(member.linkname, "hard link target")
        if not target_rel:
            raise InvalidSpec(f"layer tar hard link {rel!r} points at the layer root: rejected")
        self._ensure_parent(target_rel)
        target = self._path(target_rel)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise InvalidSpec(
                f"layer tar hard link {rel!r} → {member.linkname!r} points outside this layer or at a missing entry: rejected"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise InvalidSpec(f"layer tar hard link {rel!r} points at directory {member.linkname!r}: rejected")
        os.link(target, path, follow_symlinks=False)

    def _meta(self, rel: str, member: tarfile.TarInfo) -> None:
        path = self._path(rel)
        os.lchown(path, member.uid, member.gid)
        for key, value in member.pax_headers.items():
            if key.startswith("SCHILY.xattr.") and not key.startswith("SCHILY.xattr.trusted.overlay."):
                try:
                    os.setxattr(path, key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
                except OSError:
                    pass  # xattr namespace not supported by the store's filesystem: contents still correct
        if member.issym():
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
            return
        os.chmod(path, member.mode & 0o7777)
        if member.isdir():
            self._dir_times.append((rel, member.mtime))
        else:
            os.utime(path, (member.mtime, member.mtime))

    def finish(self) -> None:
        """Set directory mtimes last: creating children would otherwise bump them."""
        for rel, mtime in reversed(self._dir_times):
            path = self._path(rel)
            if os.path.isdir(path) and not os.path.islink(path):
                os.utime(path, (mtime, mtime))


def _copy_range(src_fd: int, dst_fd: int, offset: int, size: int, name: str) -> None:
    """Copy `size` bytes at `offset` of `src_fd` into `dst_fd` without passing them through userspace."""
    left = size
    while left > 0:
        try:
            done = os.copy_file_range(src_fd, dst_fd, min(left, 1 << 30), offset_src=offset + size - left)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            # the archive is on another filesystem than the store: this kernel refuses copy_file_range across
            # superblocks (EXDEV), so copy in the kernel with sendfile instead
            done = os.sendfile(dst_fd, src_fd, offset + size - left, min(left, 1 << 30))
        if done == 0:
            raise InvalidSpec(f"layer is not a valid tar stream: truncated inside {name!r}; rejected")
        left -= done


def _apply_entries(tar: tarfile.TarFile, writer: _LayerWriter) -> None:
    for member in tar:
        rel = _normalize(member.name, "entry")
        base = rel.rpartition("/")[2]
        if base.startswith(WHITEOUT_PREFIX):
            writer.whiteout(rel)
        else:
            writer.add(tar, member, rel)


@dataclass(frozen=True)
class FileRegion:
    """A layer blob that lies in a file at [offset, offset + size): a layout blob, a member of a docker-save tar."""

    path: Path
    offset: int
    size: int

    def head(self, n: int) -> bytes:
        with open(self.path, "rb") as fh:
            return os.pread(fh.fileno(), min(n, self.size), self.offset)

    def is_gzip(self) -> bool:
        return self.head(2) == _GZIP_MAGIC


class _RegionReader(io.RawIOBase):
    """A seekable read-only view of [start, start + size) of `fd` (so tarfile sees the region as a whole file)."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self._size - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos) if n else b""
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def extract_plain_region(region: FileRegion, dest: Path) -> int:
    """Extract the uncompressed layer tar in `region` into the empty directory `dest`; returns bytes unpacked.

    Random access: tarfile parses only the headers and each file's bytes are copied inside the kernel
    (copy_file_range), which is what makes a cold import of big layers cheap. The caller verifies the digest.
    """
    with open(region.path, "rb") as fh:
        writer = _LayerWriter(dest, data_fd=fh.fileno(), data_start=region.offset)
        view = io.BufferedReader(_RegionReader(fh.fileno(), region.offset, region.size), 64 << 10)
        try:
            with tarfile.open(fileobj=view, mode="r:", tarinfo=_BoundedTarInfo) as tar:  # type: ignore[call-overload]
                _apply_entries(tar, writer)
        except (tarfile.TarError, EOFError) as exc:
            raise InvalidSpec(f"layer is not a valid tar stream: {exc}") from exc
        writer.finish()
    return writer.unpacked


def extract_layer_file(blob: Path, dest: Path, blob_digest: str) -> ExtractResult:
    """Extract a landed, already verified layer blob (`blob_digest`) into the empty directory `dest`.

    A gzip blob streams through `extract_layer` (its diff_id must be computed); a plain tar's diff_id *is* its
    blob digest, so it goes through `extract_plain_region`.
    """
    region = FileRegion(blob, 0, blob.stat().st_size)
    if region.is_gzip():
        with open(blob, "rb") as fh:
            return extract_layer(fh, dest)
    unpacked = extract_plain_region(region, dest)
    return ExtractResult(blob_digest, region.size, blob_digest, unpacked, False)


def extract_layer(src: BinaryIO, dest: Path, blob_tee: BinaryIO | None = None, limit: int | None = None) -> ExtractResult:
    """Extract a (gzip or uncompressed) layer tar from `src` into the empty directory `dest`.

    `blob_tee` receives the raw bytes (to store the blob in the same pass); `limit` caps the raw size
    (the descriptor's size, so a lying source cannot stream forever).
    """
    raw = HashingReader(src, tee=blob_tee, limit=limit)
    head = raw.read(2)
    compressed = head == _GZIP_MAGIC
    stream: BinaryIO = _Prefixed(head, raw)  # type: ignore[assignment]
    if compressed:
        stream = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
    plain = HashingReader(stream)
    writer = _LayerWriter(dest)
    try:
        with tarfile.open(fileobj=plain, mode="r|", tarinfo=_BoundedTarInfo) as tar:  # type: ignore[call-overload]
            _apply_entries(tar, writer)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InvalidSpec(f"layer is not a valid tar stream: {exc}") from exc
    writer.finish()
    plain.drain()
    raw.drain()
    return ExtractResult(raw.digest, raw.size, plain.digest, writer.unpacked, compressed)
