"""One live run per output folder: a lock file naming its owner (host, pid), refreshed by a heartbeat.

Two runs writing the same checkpoint files corrupt each other's resume point (e.g. orphan torchrun workers still
training when the job is relaunched). The lock `.run.lock` is created exclusively; a second run is refused with
the owner's host and pid. A lock is stale, and taken over with a warning, when its owner is on this host and its
pid is gone (or now belongs to another process), or, for an owner on another host, when its heartbeat (the file's
mtime, touched every `HEARTBEAT_S`) is older than `STALE_S` (a preempted node that vanished). A lock of another host
with a recent heartbeat is watched until it goes stale (taken over: a job requeued onto other nodes right after a
SIGKILL resumes by itself) or its heartbeat advances (refused: that run is alive). A takeover moves the stale lock
aside for a moment (`.run.lock.stale.<host>.<pid>`); one left by a launcher that died there is removed later.
"""
import atexit
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dist

logger = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
HEARTBEAT_S, STALE_S = 30.0, 300.0
POLL_S = 5.0  # how often a remote owner's heartbeat is looked at while waiting for it


class RunLockError(RuntimeError):
    """The output folder is in use by another live run; the message names it."""


def _process_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc), to tell a reused pid from the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` exists on this host (and, given its recorded `start`, is still the same process)."""
    if pid <= 0:  # a damaged lock file
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return start is None or _process_start(pid) in (None, start)


class RunLock:
    """Held by this process until `release()` (also at interpreter exit); `acquire` raises RunLockError.
    `took_over`: the warning about the stale lock it replaced, if any (`lock_output_folder` logs it)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.took_over: str | None = None
        self._stop = threading.Event()

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a stale lock removed by us (or a racing run) is retried
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True).start()
            atexit.register(self.release)
            self._remove_left_asides()
            return self
        raise RunLockError(f"could not take the run lock {self.path}")

    def _clear_if_stale(self) -> None:
        owner = read_owner(self.path)
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: retry
        if owner is None:  # being written (retry), or left empty by a crash long ago
            if age > HEARTBEAT_S:
                self._remove_if_still(None)
            time.sleep(0.1)
            return
        here = owner.get("host") == self.owner["host"]
        if here and owner.get("pid") == self.owner["pid"]:  # an earlier main() of this very process
            self.path.unlink(missing_ok=True)
            return
        if not here and age <= STALE_S:
            age = self._watch_remote_owner(owner, age)
            if age is None:
                return  # released or replaced meanwhile: retry
        if here and not pid_alive(int(owner.get("pid", -1)), owner.get("start")) or not here and age > STALE_S:
            if self._remove_if_still(owner):
                self.took_over = (f"took over the stale run lock {self.path} of {owner.get('host')} pid "
                                  f"{owner.get('pid')} ({'exited' if here else f'no heartbeat for {age:.0f}s'})")
            return
        raise RunLockError(f"{self.path.parent} is in use by a live run: host {owner.get('host')}, pid "
                           f"{owner.get('pid')}, since {owner.get('since')}. Stop that run (orphan torchrun workers "
                           f"included) or choose another output folder; if it is dead, delete {self.path}")

    def _remove_if_still(self, owner: dict[str, Any] | None) -> bool:
        """Remove the lock file if it still names the stale `owner` (None: an empty or unreadable file left by a
        crash) -> whether it did. It is moved aside atomically and read there: of two launchers that both judged it
        stale, the second would otherwise delete the first's fresh lock and start a second live run; a lock that is
        not the stale one any more is put back."""
        aside = self.path.with_name(f"{self.path.name}.stale.{self.owner['host']}.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # removed meanwhile: retry
        if read_owner(aside) == owner:
            aside.unlink(missing_ok=True)
            return True
        try:  # another run's fresh lock: back where it was (link: fails if a third has made one meanwhile)
            os.link(aside, self.path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not self.path.exists():
                os.replace(aside, self.path)
        aside.unlink(missing_ok=True)
        return False

    def _remove_left_asides(self) -> None:
        """Delete stale locks that `_remove_if_still` moved aside and a launcher killed there left: those of a dead
        process of this host, and any older than STALE_S (a live launcher's exists for milliseconds)."""
        for aside in self.path.parent.glob(f"{LOCK_NAME}.stale.*"):
            host, _, pid = aside.name[len(LOCK_NAME) + len(".stale."):].rpartition(".")
            try:
                old = time.time() - aside.stat().st_ctime > STALE_S  # ctime: when it was moved aside
            except FileNotFoundError:
                continue
            if old or host == self.owner["host"] and pid.isdigit() and not pid_alive(int(pid)):
                aside.unlink(missing_ok=True)

    def _watch_remote_owner(self, owner: dict[str, Any], age: float) -> float | None:
        """Wait until the lock of `owner` (another host; heartbeat `age` s ago) is older than STALE_S, or its
        heartbeat advances (the owner lives) -> its age then; None if the lock was released or replaced."""
        logger.warning("%s is held by host %s pid %s, whose last heartbeat was %.0fs ago: waiting up to %.0fs for it "
                       "to go stale (a live run refreshes it every %.0fs)", self.path, owner.get("host"),
                       owner.get("pid"), age, STALE_S - age, HEARTBEAT_S)
        try:
            seen = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        while True:
            time.sleep(min(POLL_S, max(0.0, STALE_S - age) + 0.05))
            try:
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            if read_owner(self.path) != owner:
                return None
            age = time.time() - mtime
            if mtime != seen or age > STALE_S:
                return age

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # moved aside for a moment by a launcher checking whether it is stale
                continue
            except OSError:
                return

    def release(self) -> None:
        """Remove the lock if this process still owns it (idempotent)."""
        self._stop.set()
        if read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


def lock_output_folder(folder: str | os.PathLike, holder: bool,
                       on_locked: Callable[[], None] | None = None) -> RunLock | None:
    """Collective: the `holder` ranks (those that write checkpoints into `folder`) take its lock; if any cannot,
    every rank raises its RunLockError, so no rank is left waiting. Once every lock is taken, `on_locked` runs (e.g.
    opening the run's log file, which a run refused for a live one's folder must not write into); the takeover of a
    stale lock is logged after it, so into that file too (and before the error of a refused run)."""
    lock = None
    try:
        with dist.raised_on_every_rank(RunLockError):
            lock = RunLock(folder).acquire() if holder else None
        if on_locked is not None:
            on_locked()
    except RunLockError:  # this rank's or another's
        if lock is not None:
            lock.release()
        raise
    finally:
        if lock is not None and lock.took_over:
            logger.warning(lock.took_over)
    return lock


def read_owner(path: Path) -> dict[str, Any] | None:
    """The owner recorded in a lock file, None if it is absent or not (yet) complete."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
