"""One writer at a time per set of tables: a lease object on the tables' own storage.

Delta's default log store for ``s3://``/``s3a://`` is safe only when every writer shares one driver: two drivers
committing the same version overwrite each other's commit without an error. Every command that writes holds this
lease for its whole run (:func:`writer_lease`), so an Airflow retry beside a live attempt, two backfill days or a
notebook beside the nightly job take turns instead.

The lease is one small JSON object beside the images table (``lease.location``, default
``<images_table>_lease.json``), created atomically: a conditional put (``If-None-Match: *``) on S3, an exclusive
create under a file lock on local disks. Its holder renews it every ``ttl / 5`` (heartbeat) and deletes it on exit;
a holder that died leaves a lease that expires ``lease.ttl_seconds`` after its last heartbeat, and the next run
takes it over (a conditional put on the expired object's ETag, so of two runs only one wins). A run that finds the
lease held waits up to ``lease.wait_seconds``, then fails naming the holder and since when.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from image_embeddings import uri

if TYPE_CHECKING:
    from image_embeddings.config import AppConfig

log = logging.getLogger(__name__)


class LeaseHeldError(RuntimeError):
    """Another run holds the lease on these tables; this run wrote nothing."""


@dataclass(frozen=True)
class LeaseSettings:
    """Where the lease lives and how long to wait for it and keep it."""

    location: str
    wait_seconds: float = 600.0
    ttl_seconds: float = 300.0
    endpoint: str | None = None
    region: str | None = None


class LeaseStore(Protocol):
    """Atomic operations on one small object; a token identifies the version read or written."""

    def create(self, body: bytes) -> str | None: ...
    def read(self) -> tuple[bytes, str] | None: ...
    def replace(self, token: str, body: bytes) -> str | None: ...
    def delete(self, token: str) -> None: ...


class LocalLeaseStore:
    """A lease file; every change is made under an exclusive ``flock`` of a lock file beside it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, body: bytes) -> str:
        temp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        temp.write_bytes(body)
        os.replace(temp, self.path)
        return _token(body)

    def create(self, body: bytes) -> str | None:
        with self._locked():
            return None if self.path.exists() else self._write(body)

    def read(self) -> tuple[bytes, str] | None:
        try:
            body = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return body, _token(body)

    def replace(self, token: str, body: bytes) -> str | None:
        with self._locked():
            current = self.read()
            return self._write(body) if current is not None and current[1] == token else None

    def delete(self, token: str) -> None:
        with self._locked():
            current = self.read()
            if current is not None and current[1] == token:
                self.path.unlink()


def _token(body: bytes) -> str:
    import hashlib

    return hashlib.sha256(body).hexdigest()


class S3LeaseStore:
    """A lease object on S3, changed only by conditional requests (``If-None-Match``, ``If-Match`` on the ETag)."""

    def __init__(self, location: str, endpoint: str | None, region: str | None) -> None:
        from image_embeddings.weights import S3Access, s3_client

        self.bucket, self.key = uri.split_s3(location)
        self.client = s3_client(S3Access(endpoint, region))

    def _put(self, body: bytes, **condition: str) -> str | None:
        try:
            return str(self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"])
        except Exception as exc:
            if _status(exc) in (409, 412):  # someone else created or changed it first
                return None
            raise

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def read(self) -> tuple[bytes, str] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _status(exc) == 404:
                return None
            raise
        return got["Body"].read(), str(got["ETag"])

    def replace(self, token: str, body: bytes) -> str | None:
        return self._put(body, IfMatch=token)

    def delete(self, token: str) -> None:
        # Checked by a read first: not every S3 implementation honours If-Match on DELETE (MinIO ignores it).
        current = self.read()
        if current is None or current[1] != token:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
        except Exception as exc:
            if _status(exc) not in (404, 412):
                raise


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = (response or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def store_for(settings: LeaseSettings) -> LeaseStore | None:
    """The store of ``settings.location``, or None where this package has no atomic create (see the README)."""
    if uri.is_local(settings.location):
        return LocalLeaseStore(uri.local_path(settings.location))
    if uri.is_s3(settings.location):
        return S3LeaseStore(settings.location, settings.endpoint, settings.region)
    return None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _document(owner: str, command: str, started: str, ttl: float) -> bytes:
    now = _now()
    return json.dumps({"owner": owner, "command": command, "started_at": started,
                       "heartbeat_at": now.isoformat(timespec="seconds"),
                       "expires_at": (now + dt.timedelta(seconds=ttl)).isoformat(timespec="seconds")},
                      sort_keys=True).encode()


def _holder(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _expired(holder: dict[str, Any]) -> bool:
    try:
        return _now() >= dt.datetime.fromisoformat(str(holder["expires_at"]))
    except (KeyError, ValueError):
        return True  # unreadable: nobody can renew it


class Lease:
    """A lease this process holds, renewed by a daemon thread until :meth:`release`."""

    def __init__(self, store: LeaseStore, settings: LeaseSettings, command: str) -> None:
        self.store, self.settings, self.command = store, settings, command
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.started = _now().isoformat(timespec="seconds")
        self.token: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease, waiting up to ``wait_seconds`` for its holder; raise :class:`LeaseHeldError` past that."""
        deadline = time.monotonic() + self.settings.wait_seconds
        waited = False
        while True:
            body = _document(self.owner, self.command, self.started, self.settings.ttl_seconds)
            self.token = self.store.create(body)
            current = None if self.token is not None else self.store.read()
            if self.token is None and current is not None and _expired(_holder(current[0])):
                self.token = self.store.replace(current[1], body)
                if self.token is not None:
                    log.warning("took over the expired lease %s of %s", self.settings.location,
                                _describe(_holder(current[0])))
            if self.token is not None:
                break
            if current is not None and time.monotonic() >= deadline:
                raise LeaseHeldError(_held_message(self.settings, _holder(current[0])))
            if current is not None and not waited:
                log.info("waiting up to %.0f s for the lease %s, held by %s", self.settings.wait_seconds,
                         self.settings.location, _describe(_holder(current[0])))
                waited = True
            time.sleep(max(0.05, min(2.0, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._renew, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.settings.ttl_seconds / 5):
            try:
                token = self.store.replace(self.token or "", _document(self.owner, self.command, self.started,
                                                                       self.settings.ttl_seconds))
            except Exception as exc:  # a transient store error: the next beat tries again, well before expiry
                log.warning("could not renew the lease %s: %s", self.settings.location, exc)
                continue
            if token is None:
                self.lost = True
                log.error("lost the lease %s: another run took it over after it expired", self.settings.location)
                return
            self.token = token

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.token is not None and not self.lost:
            try:
                self.store.delete(self.token)
            except Exception as exc:  # it expires by itself
                log.warning("could not release the lease %s: %s", self.settings.location, exc)


def _describe(holder: dict[str, Any]) -> str:
    return (f"{holder.get('command', '?')} run {holder.get('owner', '?')} since {holder.get('started_at', '?')} "
            f"(last heartbeat {holder.get('heartbeat_at', '?')})")


def _held_message(settings: LeaseSettings, holder: dict[str, Any]) -> str:
    return (f"another run holds the lease on these tables: {_describe(holder)}; waited {settings.wait_seconds:.0f} s "
            f"(lease.wait_seconds). Nothing was written. Run again when it has finished; a lease whose holder died "
            f"expires {settings.ttl_seconds:.0f} s after its last heartbeat ({settings.location})")


_held: dict[str, tuple[Lease, int]] = {}
_held_lock = threading.Lock()


@contextlib.contextmanager
def holding(settings: LeaseSettings, command: str) -> Iterator[Lease | None]:
    """Hold the lease of ``settings.location`` for the block; nested holds in one process share the outer one."""
    with _held_lock:
        if settings.location in _held:
            lease, depth = _held[settings.location]
            _held[settings.location] = (lease, depth + 1)
            outer = False
        else:
            outer = True
    if not outer:
        try:
            yield lease
        finally:
            with _held_lock:
                lease, depth = _held[settings.location]
                _held[settings.location] = (lease, depth - 1)
        return
    store = store_for(settings)
    if store is None:
        log.info("no lease on %s: this storage has no atomic create here (see the README on overlapping runs)",
                 settings.location)
        yield None
        return
    lease = Lease(store, settings, command)
    lease.acquire()
    with _held_lock:
        _held[settings.location] = (lease, 1)
    try:
        yield lease
    finally:
        with _held_lock:
            del _held[settings.location]
        lease.release()


def settings_for(config: AppConfig) -> LeaseSettings:
    """The lease settings of a validated config."""
    return LeaseSettings(config.lease.location_for(config.output.images), float(config.lease.wait_seconds),
                         float(config.lease.ttl_seconds), config.s3.endpoint, config.s3.region)


def writer_lease(config: AppConfig, command: str) -> contextlib.AbstractContextManager[Lease | None]:
    """Hold the lease of ``config``'s tables for a command that writes (see :func:`holding`)."""
    return holding(settings_for(config), command)


F = TypeVar("F", bound=Callable[..., Any])


def leased(command: str) -> Callable[[F], F]:
    """Decorate a command's function ``(spark, config, ...)`` to run holding its tables' lease."""
    import functools

    def wrap(function: F) -> F:
        @functools.wraps(function)
        def run(spark: Any, config: AppConfig, *args: Any, **kwargs: Any) -> Any:
            with writer_lease(config, command):
                return function(spark, config, *args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap
