"""The lease a run holds on a stage's output directory, so that two drivers never both write it.

`Lease.acquire` writes `_LEASE.json` (holder id, stage, host, pid, wall-clock time of the last
renewal) before the run touches anything else, and a daemon thread renews it every `RENEW_S`
seconds. Another driver finding a live lease is refused (`OutputBusyError`, nothing touched).
A lease is dead, and taken over by the next run, when it was not renewed for `TTL_S` seconds
(its holder crashed or lost the store), at once when its holder was a process of this host that
no longer exists, or when this process held it (a stage re-run in one session).

Writes are conditional where the store offers it: a new lease is created exclusively (local:
a hard link, which fails when the file exists; S3: `If-None-Match: *`), a dead one replaced only
if unchanged (S3: `If-Match` on its ETag). Every acquisition but a local create is read back
after `SETTLE_S`, so of two racing drivers on a store that ignores the conditions (as the
loopback `rclone serve s3` of the tests does), one still backs off; a holder
that finds another holder at a renewal has lost the lease, and its commit is refused
(`check`). The lease is deleted when the run commits (`release`) or its output object goes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipelines.io.storage import Location, redact, retry_io, write_bytes_atomic

LEASE = "_LEASE.json"
TTL_S = 30.0  # a lease not renewed for this long is dead
RENEW_S = 10.0  # the holder renews this often
SETTLE_S = 0.3  # wait before reading an acquisition back
_HELD: dict[str, Lease] = {}  # output URI -> this process's lease on it
_HELD_LOCK = threading.Lock()


class OutputBusyError(RuntimeError):
    """Another live run holds the output directory (or took it over from this run)."""


@dataclass(frozen=True)
class Holder:
    """What a lease file says: who holds it and when it was last renewed."""

    holder: str
    stage: str
    host: str
    pid: int
    renewed: float  # time.time() of the last renewal

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder a lease file names, or None for a file that is not one (dead)."""
        try:
            doc = json.loads(data.decode("utf-8"))
            return cls(
                holder=str(doc["holder"]),
                stage=str(doc["stage"]),
                host=str(doc["host"]),
                pid=int(doc["pid"]),
                renewed=float(doc["renewed"]),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps({**self.__dict__, "ttl_s": TTL_S}, sort_keys=True).encode()

    def is_dead(self) -> bool:
        """Not renewed for `TTL_S`, or held by a process of this host that is gone or is us."""
        if time.time() - self.renewed > TTL_S:
            return True
        if self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def describe(self) -> str:
        ago = max(0.0, time.time() - self.renewed)
        return (
            f"a {self.stage} run on {self.host} (pid {self.pid}, lease {self.holder[:8]}, "
            f"renewed {ago:.0f} s ago)"
        )


class Lease:
    """This process's lease on one output directory; renewed until `release`."""

    def __init__(self, location: Location, holder: Holder) -> None:
        self.location, self.holder = location, holder
        self.lost: str | None = None  # why, once another run holds it
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"lease {location.uri}", daemon=True
        )

    @classmethod
    def acquire(cls, location: Location, *, stage: str) -> Lease:
        """Takes the lease on `location` for a run of `stage` and starts renewing it.

        Raises:
            OutputBusyError: a live run holds it.
        """
        me = Holder(uuid.uuid4().hex, stage, socket.gethostname(), os.getpid(), time.time())
        for _ in range(3):
            current, etag = _read(location)
            if current is not None and not current.is_dead():
                raise OutputBusyError(_busy_message(location, current))
            with _HELD_LOCK:
                previous = _HELD.pop(location.uri, None)
            if previous is not None:  # this process's earlier run on it ends here
                previous.lost = "a later run in this process took it over"
                previous.stop()
            if not _write_new(location, me, replacing=current is not None, etag=etag):
                continue  # someone created or replaced it first: look again
            if not (location.is_local and current is None):  # a hard link is exclusive
                time.sleep(SETTLE_S)
            found, _ = _read(location)
            if found is None or found.holder != me.holder:
                if found is not None and not found.is_dead():
                    raise OutputBusyError(_busy_message(location, found))
                continue
            lease = cls(location, me)
            with _HELD_LOCK:
                _HELD[location.uri] = lease
            lease._thread.start()
            return lease
        raise OutputBusyError(f"{location.uri}: could not take the lease (other runs racing)")

    def check(self) -> None:
        """Raises `OutputBusyError` when another run took the lease over."""
        if self.lost:
            raise OutputBusyError(f"{self.location.uri} was taken over: {self.lost}")

    def stop(self) -> None:
        """Stops renewing (the lease then dies after `TTL_S`)."""
        self._stop.set()

    def release(self) -> None:
        """Stops renewing and deletes the lease file if it is still this run's."""
        self.stop()
        with _HELD_LOCK:
            if _HELD.get(self.location.uri) is self:
                del _HELD[self.location.uri]
        try:
            current, _ = _read(self.location)
            if current is not None and current.holder == self.holder.holder:
                target = self.location.child(LEASE)
                target.fs.rm(target.path)
        except Exception:  # noqa: BLE001  (best effort: it dies by itself after TTL_S)
            pass

    def release_soon(self) -> None:
        """`release` on a thread of its own: safe from a finalizer, which may run on any
        thread (an event loop's included)."""
        self.stop()
        threading.Thread(target=self.release, name="lease release", daemon=True).start()

    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(RENEW_S):
            try:
                current, etag = _read(self.location)
                if current is None or current.holder != self.holder.holder:
                    self.lost = current.describe() if current else "the lease file is gone"
                    return
                renewed = Holder(**{**self.holder.__dict__, "renewed": time.time()})
                _write(self.location, renewed, if_match=etag)
                self.holder, last_ok = renewed, time.monotonic()
            except Exception as error:  # noqa: BLE001  (botocore's connection errors are not
                # OSErrors; any failed renewal counts, and this thread must not die of one)
                if time.monotonic() - last_ok > TTL_S:
                    self.lost = f"not renewed for {TTL_S:.0f} s ({redact(str(error))})"
                    return


def _busy_message(location: Location, holder: Holder) -> str:
    if holder.host == socket.gethostname():
        when = "at once (a lease of a process gone from this machine is taken over)"
    else:
        wait = max(0.0, TTL_S - (time.time() - holder.renewed))
        when = f"in {wait:.0f} s, once its lease has expired"
    return (
        f"{location.uri} is in use by {holder.describe()}: not touched. Wait for it to finish; "
        f"if it has died, run the same command again {when}"
    )


def _read(location: Location) -> tuple[Holder | None, str | None]:
    """The lease's holder (None: no lease, or an unreadable one) and its ETag on S3."""
    target = location.child(LEASE)
    fs = target.fs
    try:
        data = retry_io(lambda: fs.cat_file(target.path), what=f"read {target.uri}")
    except FileNotFoundError:
        return None, None
    etag = None
    if not target.is_local:
        try:
            etag = str(fs.info(target.path).get("ETag") or "") or None
        except FileNotFoundError:
            return None, None
    holder = Holder.parse(data)
    if holder is None:  # not a lease: treat as a dead one (replaced if unchanged)
        holder = Holder("unreadable", "?", "?", -1, 0.0)
    return holder, etag


def _write_new(location: Location, holder: Holder, *, replacing: bool, etag: str | None) -> bool:
    """Creates (or, `replacing` a dead lease, replaces) the lease file; False when another run
    won the condition."""
    target = location.child(LEASE)
    data = holder.to_bytes()
    if target.is_local:
        if replacing:
            write_bytes_atomic(location, LEASE, data)
            return True
        os.makedirs(location.path, exist_ok=True)
        tmp = f"{target.path}.{holder.holder}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, target.path)  # fails if the lease exists: an exclusive create
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    try:
        if replacing:
            _write(location, holder, if_match=etag)
        else:
            retry_io(
                lambda: target.fs.pipe_file(target.path, data, mode="create"),
                what=f"write {target.uri}",
            )
    except FileExistsError:
        return False
    except OSError as error:
        if "PreconditionFailed" in str(error) or "412" in str(error):
            return False
        raise
    return True


def _write(location: Location, holder: Holder, *, if_match: str | None) -> None:
    """Writes the lease file (S3: only if its ETag is still `if_match`)."""
    target = location.child(LEASE)
    if target.is_local or not if_match:
        write_bytes_atomic(location, LEASE, holder.to_bytes())
        return
    kwargs: dict[str, Any] = {"IfMatch": if_match}
    retry_io(
        lambda: target.fs.pipe_file(target.path, holder.to_bytes(), **kwargs),
        what=f"write {target.uri}",
    )
