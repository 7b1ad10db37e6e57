"""Files replaced whole: written beside their name, synced and renamed over it, so that a reader, a kill -9, a full disk
or a power cut sees the previous file or the new one, never half of one (core; no torch).

The temporary is hidden and unique (`.NAME.PID.RANDOM.tmp`): one a kill -9 left behind never blocks the next write,
and no reader takes it for a result (none lists hidden or `.tmp` files). It is safe to delete."""
from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write the whole file to; when the block ends without an error it is
    synced and renamed over `path`, otherwise removed (the previous `path` stays byte for byte)."""
    if os.path.exists(path) and not os.path.isfile(path):   # a pipe or a device (/dev/stdout): written in place
        yield Path(path)
        return
    path = Path(os.path.realpath(path))   # through a link: the file it names is replaced, the link stays
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if path.is_file():   # the previous file's permissions, which writing it in place kept (an audit CSV's 0600)
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is not None and os.fspath(e.filename) == os.fspath(tmp):   # name the file the user asked for
            raise type(e)(e.errno, f"{e.strerror} (writing it through {tmp.name} beside it)", str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a file created, renamed or removed in it stays so after a power cut (POSIX; nothing
    where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
