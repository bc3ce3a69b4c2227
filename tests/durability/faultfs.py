"""A passthrough FUSE filesystem that answers EIO to every write, fsync and create while a flag file exists.

Run as its own process (`python faultfs.py SOURCE MOUNTPOINT FLAG`): the kernel's FUSE client then delivers
EIO to the program under test from write(2), fsync(2)/fdatasync(2) and open(O_CREAT) exactly as a failing disk
would, while reads keep working (a disk that fails writes but still reads what it had). Device-mapper's
`error`/`flakey` targets would do the same one level lower, but this kernel has no device-mapper.
"""

from __future__ import annotations

import errno
import os
import sys

from mfusepy import FUSE, FuseOSError, Operations


class FaultFS(Operations):
    def __init__(self, source: str, flag: str) -> None:
        self.source = source
        self.flag = flag

    def _path(self, path: str) -> str:
        return os.path.join(self.source, path.lstrip("/"))

    def _fault(self) -> None:
        if os.path.exists(self.flag):
            raise FuseOSError(errno.EIO)

    # -- metadata
    def access(self, path, amode):
        if not os.access(self._path(path), amode):
            raise FuseOSError(errno.EACCES)
        return 0

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid", "st_ino")
        return {key: getattr(st, key) for key in keys}

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._path(path))]

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {key: getattr(st, key) for key in keys}

    def chmod(self, path, mode):
        self._fault()
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path, uid, gid):
        self._fault()
        os.chown(self._path(path), uid, gid)
        return 0

    def utimens(self, path, times=None):
        os.utime(self._path(path), times)
        return 0

    def mkdir(self, path, mode):
        self._fault()
        os.mkdir(self._path(path), mode)
        return 0

    def rmdir(self, path):
        self._fault()
        os.rmdir(self._path(path))
        return 0

    def unlink(self, path):
        self._fault()
        os.unlink(self._path(path))
        return 0

    def rename(self, old, new):
        self._fault()
        os.rename(self._path(old), self._path(new))
        return 0

    def symlink(self, target, source):
        self._fault()
        os.symlink(source, self._path(target))
        return 0

    def readlink(self, path):
        return os.readlink(self._path(path))

    def link(self, target, source):
        self._fault()
        os.link(self._path(source), self._path(target))
        return 0

    # -- files
    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._fault()
        return os.open(self._path(path), flags)

    def create(self, path, mode, fi=None):
        self._fault()
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        self._fault()
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        self._fault()
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._path(path), length)
        return 0

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        self._fault()
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def fsyncdir(self, path, datasync, fh):
        self._fault()
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


def main() -> None:
    source, mountpoint, flag = sys.argv[1:4]
    FUSE(FaultFS(source, flag), mountpoint, foreground=True, nothreads=False)


if __name__ == "__main__":
    main()
