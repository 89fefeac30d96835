"""Writing files safely: the one atomic writer every module uses, and the output checks.

Promises kept here:
- a crash, Ctrl-C or full disk leaves the old file or the new one, never half of one;
- without `overwrite`, an existing file is never replaced, even one that appeared while the
  work ran (the final step is a hard link, which fails if the name is taken);
- `--force` replaces only a regular file, and never one of the command's own inputs.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from ..errors import OutputExistsError, ResourceError, UsageError


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_output(path: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Fail before any work is done if `path` cannot or must not be written."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise UsageError(f"{path} is a dangling symbolic link", hint="remove it or choose another output") \
                from None
        st = None
    except OSError as exc:
        raise UsageError(f"cannot use {path} as output: {exc.strerror}") from exc
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{path} is a directory")
        if not force:
            raise OutputExistsError(f"{path} exists", hint="pass --force to overwrite it")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file; --force replaces only regular files")
        for source in inputs:
            if source is not None and _same_file(path, Path(source)):
                raise UsageError(f"{path} is an input of this command; refusing to overwrite it")
    parent = _parent(path)
    if not parent.is_dir():
        raise UsageError(f"output directory does not exist: {parent}")
    try:  # really try: permission bits say nothing for root or on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"output directory is not writable: {parent} ({exc.strerror})") from exc


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def atomic_write(path: Path, data: bytes, overwrite: bool = True, inputs: tuple[Path, ...] = ()) -> Path:
    """Write `data` to a temp file beside `path`, fsync, then move it into place.

    overwrite=True replaces an existing regular file (os.replace), re-checking at that moment
    that it is not a device, a directory or one of `inputs`. overwrite=False links the temp
    file to `path`, which fails if anything took that name meanwhile."""
    path = Path(path)
    parent = _parent(path)
    if not parent.is_dir():
        raise UsageError(f"output directory does not exist: {parent}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise _os_error(exc, f"cannot write to {parent}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; our outputs are ordinary files
        if overwrite:
            if path.exists() or path.is_symlink():
                check_output(path, force=True, inputs=inputs)
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _os_error(exc, f"cannot write {path}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _link_no_clobber(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path} appeared while lcc was working; it was left as it is",
                                hint="pass --force to overwrite it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # A file system without hard links: the best we can do is check just before renaming.
        if path.exists():
            raise OutputExistsError(f"{path} appeared while lcc was working", hint="pass --force") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _os_error(exc: OSError, what: str):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceError(f"no space left: {what}")
    return UsageError(f"{what}: {exc.strerror or exc}")


def write_text(path: Path, text: str) -> Path:
    """Atomic replace of a small text file (the fingerprint cache)."""
    return atomic_write(Path(path), text.encode("utf-8"), overwrite=True)
