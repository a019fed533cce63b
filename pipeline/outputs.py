"""Output directories: checked writable before any work, and owned by one live run at a time.

The owner holds an exclusive `flock` on `<dir>/.pipeline.lock`, which also records its pid, host and
start. The kernel drops the lock when the owner dies, however it dies, so a lock left by a killed run
is free and simply taken over (and said so); a second live run on the same directory fails at once,
naming the owner.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path

from .errors import ConfigError, UserError, option

LOCK_NAME = ".pipeline.lock"


def write_error(path: Path) -> OSError | None:
    """Creates `path` if needed and writes a file in it: the error if that fails, else None."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as error:
        return error
    return None


def check_writable_dir(path: Path, setting: str = "output_dir") -> Path:
    """Proves `path` can be created and written, leaving no trace; a file or an unwritable place is a
    ConfigError naming the setting."""
    path = Path(path)
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"{option(setting)} {path}: {parent} is a file, not a directory; give a directory "
                    "(it is created if missing)"
                )
            break
        missing.append(parent)
    error = write_error(path)
    for created in missing:  # deepest first: what this check made, it removes
        with contextlib.suppress(OSError):
            created.rmdir()
    if error:
        raise ConfigError(
            f"{option(setting)} {path} cannot be written ({error.strerror or error}): give a directory you can write to"
        )
    return path


def _owner_of(handle) -> dict:
    handle.seek(0)
    try:
        owner = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def os_error_behind(error: BaseException) -> OSError | None:
    """The OSError a library error was raised from (torch.save reports a full disk as a RuntimeError of its zip
    writer, raised while handling it): the cause a user needs to see."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def process_alive(pid) -> bool:
    """Whether process `pid` (of this machine) still exists; another user's counts as alive."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class Held(Exception):
    """Another live process holds the lock; `owner` is its record (pid, host, start)."""

    def __init__(self, owner: dict):
        super().__init__(owner)
        self.owner = owner


@contextlib.contextmanager
def hold_lock(path: Path):
    """An exclusive `flock` on `path` for the block, the file recording this process (pid, host, start).
    Yields the previous holder's record, left by one the kernel freed it from (killed); raises Held when a
    live process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _owner_of(handle)
        handle.close()
        raise Held(owner) from None
    previous = _owner_of(handle)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(me))
    handle.flush()
    try:
        yield previous
    finally:
        handle.seek(0)
        handle.truncate()  # an empty record: the next holder needs no note
        handle.close()


@contextlib.contextmanager
def owned_output_dir(path: Path, setting: str = "output_dir"):
    """Holds `path` for this run: checked writable, created, then locked until the block ends. A run that
    fails before writing anything there leaves no directory behind that it created."""
    check_writable_dir(path, setting)
    created = [p for p in [path, *path.parents] if not p.exists()]  # deepest first
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            previous = stack.enter_context(hold_lock(path / LOCK_NAME))
        except Held as held:
            owner = held.owner
            raise UserError(
                f"{path} belongs to a run that is still going (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')}, started {owner.get('started', '?')}): wait for it to end, or give "
                f"another {option(setting)}"
            ) from None
        if previous.get("pid") is not None:
            print(
                f"note: {path} was held by pid {previous['pid']} on {previous.get('host', '?')}, which is no "
                "longer running (killed?); this run takes it over"
            )
        try:
            yield path
        except BaseException:
            stack.close()  # the lock released first, then what the failed run created removed
            if created and [p.name for p in path.iterdir()] == [LOCK_NAME]:
                (path / LOCK_NAME).unlink()
                for directory in created:
                    with contextlib.suppress(OSError):
                        directory.rmdir()
            raise


def check_no_saved_model(path: Path, overwrite: bool, setting: str = "output_dir") -> None:
    """A model already saved in `path` is replaced only when asked: two runs that default to one directory (a
    second seed, another draw) must not silently lose the first one's model."""
    if not overwrite and (Path(path) / "config.json").exists():
        raise ConfigError(
            f"{option(setting)} {path} already holds a saved model: pass {option('overwrite')} to replace it, or "
            f"give another {option(setting)}"
        )
