"""Shards in object storage (``s3://``, ``gs://``, ``https://``, ``file://``) through fsspec.

fsspec gives one API over every store (s3fs for S3 and S3-compatible endpoints, gcsfs for
GCS, HTTP, local files), with byte-range reads and the credential chains users already
have (boto's environment / config / instance-role chain for S3), so nothing here handles a
secret: ``storage_options`` carries endpoint and client settings only.

Reading is whole-shard: a reader reads its shards' samples in a shuffle window of a few
shards, so each shard is downloaded once (in ranges of ``CHUNK`` bytes, each retried on its
own) into a bounded local cache (:class:`ShardCache`) and read with ``pread`` through the
index, exactly as a local shard. The cache is LRU by bytes and never holds more than its
limit: a download first reserves its full size (the partial file is sized up front) under a
lock file, evicting the least recently used shards; the finished file is renamed into place
atomically, so readers of several actors on one node share it safely.

Faults: transient errors (5xx, timeouts, connection resets, a range cut short) are retried
with exponential backoff and counted in :class:`StoreStats`; a missing object (or one we may
not read) is a :class:`DataError` naming the URL, which the caller's ``on_error`` policy
raises or quarantines. URLs are shown redacted (:func:`redact`: no ``user:pass@``, no query).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mixflow.errors import DataError

CHUNK = 8 * 2**20  # bytes per ranged GET of a shard download
ATTEMPTS = 6  # tries per request before a transient error becomes a DataError
BACKOFF_S = 0.05  # first retry delay; doubles per try (capped at 2 s), with jitter
DEFAULT_CACHE_LIMIT = 10 * 2**30
SECRET_OPTIONS = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                  "aws_session_token", "session_token", "credentials")
# Errors that no retry can cure: the object is not there or we may not read it.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_url(path) -> bool:
    return "://" in str(path)


def redact(url) -> str:
    """``url`` without credentials (``user:pass@``) or query string (signed-URL tokens)."""
    url = str(url)
    if not is_url(url):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


@dataclass
class StoreStats:
    """What a process did with the store: requests retried, downloads, cache hits and evictions."""
    retries: int = 0
    downloads: int = 0
    bytes_downloaded: int = 0
    cache_hits: int = 0
    evictions: int = 0
    errors: list[str] = field(default_factory=list)  # the last transient errors (redacted), for the summary

    def as_dict(self) -> dict:
        return {"retries": self.retries, "downloads": self.downloads, "bytes_downloaded": self.bytes_downloaded,
                "cache_hits": self.cache_hits, "evictions": self.evictions, "last_errors": self.errors[-5:]}

    def add(self, other: dict) -> None:
        for name in ("retries", "downloads", "bytes_downloaded", "cache_hits", "evictions"):
            setattr(self, name, getattr(self, name) + int(other.get(name, 0)))
        self.errors = (self.errors + list(other.get("last_errors", [])))[-5:]


@dataclass(frozen=True)
class StoreConfig:
    """How readers reach remote shards: the cache and fsspec's options (JSON, no secrets)."""
    cache_dir: str
    cache_limit: int = DEFAULT_CACHE_LIMIT
    storage_options: str = "{}"

    @classmethod
    def make(cls, cache_dir: str | None, cache_limit: int | None, storage_options: dict | None) -> "StoreConfig":
        check_storage_options(storage_options or {})
        return cls(str(cache_dir or default_cache_dir()), int(cache_limit or DEFAULT_CACHE_LIMIT),
                   json.dumps(storage_options or {}, sort_keys=True))

    @property
    def options(self) -> dict:
        return json.loads(self.storage_options)


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "mixflow-shard-cache"


def check_storage_options(options: dict) -> None:
    bad = sorted(k for k in options if k.lower() in SECRET_OPTIONS)
    if bad:
        raise ValueError(f"storage_options must not hold credentials ({', '.join(bad)}): they come from the "
                         "standard environment / config chain (AWS_* variables, ~/.aws, instance roles, "
                         "GOOGLE_APPLICATION_CREDENTIALS)")


_FILESYSTEMS: dict[tuple[str, str], object] = {}


def filesystem(url: str, options: dict | None = None):
    """``(fs, path)`` for ``url``. For S3, mixflow does the retrying (so each retry is counted):
    s3fs and botocore are asked for one attempt unless ``options`` say otherwise."""
    import fsspec

    options = dict(options or {})
    protocol = urlsplit(url).scheme
    retries = None
    if protocol in ("s3", "s3a"):
        retries = int(options.pop("retries", 1))  # s3fs's own tries per request (a class attribute)
        config = dict(options.pop("config_kwargs", {}) or {})
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        options["config_kwargs"] = config
    key = (protocol, json.dumps(options, sort_keys=True, default=str), retries)
    if key not in _FILESYSTEMS:
        try:
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        except ImportError as exc:
            raise DataError(f"cannot read {protocol}:// URLs: {exc} (pip install 'mixflow[s3]' for s3://, "
                            "gcsfs for gs://, aiohttp for https://)") from None
        if retries is not None:
            fs.retries = retries
        _FILESYSTEMS[key] = fs
    fs = _FILESYSTEMS[key]
    return fs, fs._strip_protocol(url) if protocol not in ("http", "https") else url


def retrying(call, url: str, stats: StoreStats, what: str = "read", attempts: int = ATTEMPTS):
    """``call()`` retried on transient errors with exponential backoff (each retry counted in
    ``stats``); a permanent error, or the last transient one, is a :class:`DataError` naming ``url``."""
    delay = BACKOFF_S
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except (DataError, TypeError, AttributeError):  # ours, or a bug: no retry cures it
            raise
        except PERMANENT as exc:
            why = "object does not exist" if isinstance(exc, FileNotFoundError) else f"cannot {what}: {_why(exc)}"
            raise DataError(why, shard=redact(url)) from None
        except Exception as exc:  # noqa: BLE001 - 5xx, timeouts, resets, short reads: the store's own types
            if attempt == attempts:
                raise DataError(f"cannot {what} after {attempts} attempts: {_why(exc)}", shard=redact(url)) from None
            stats.retries += 1
            stats.errors = (stats.errors + [f"{redact(url)}: {_why(exc)}"])[-5:]
            time.sleep(min(2.0, delay) * (0.5 + (uuid.uuid4().int % 1000) / 1000))
            delay *= 2


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return _strip_urls(text)[:300]


def _strip_urls(text: str) -> str:
    """Credentials and query strings out of any URL inside an error text."""
    import re

    return re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+", lambda m: redact(m.group(0)), text)


def read_range(url: str, options: dict, stats: StoreStats, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the object at ``url``; a short answer is retried like an error."""
    fs, path = filesystem(url, options)

    def once() -> bytes:
        data = fs.cat_file(path, start=start, end=end)
        if len(data) != end - start:
            raise ConnectionError(f"short read: {len(data)} of {end - start} bytes at offset {start}")
        return data

    return retrying(once, url, stats)


def read_object(url: str, options: dict, stats: StoreStats) -> bytes:
    fs, path = filesystem(url, options)
    return retrying(lambda: fs.cat_file(path), url, stats)


def list_objects(url: str, options: dict, stats: StoreStats) -> dict[str, int]:
    """``name -> size`` of the objects directly under the prefix ``url``."""
    fs, path = filesystem(url, options)

    def once() -> dict[str, int]:
        fs.invalidate_cache(path)
        return {Path(e["name"]).name: int(e.get("size") or 0) for e in fs.ls(path, detail=True)
                if e.get("type") != "directory"}

    try:
        return retrying(once, url, stats, "list")
    except DataError as err:
        raise DataError(f"shard location {redact(url)}: {err.reason}") from None


def list_prefixes(url: str, options: dict, stats: StoreStats) -> list[str]:
    """Names of the "directories" (common prefixes) directly under the prefix ``url``."""
    fs, path = filesystem(url, options)

    def once() -> list[str]:
        fs.invalidate_cache(path)
        return sorted(Path(e["name"]).name for e in fs.ls(path, detail=True) if e.get("type") == "directory")

    return retrying(once, url, stats, "list")


@dataclass(frozen=True)
class RemoteDir:
    """A prefix in object storage that stands where a directory ``Path`` would: ``/`` joins,
    ``name`` is the last part, ``store`` says how to read it (pickled whole to the actors)."""
    url: str
    store: StoreConfig

    def __truediv__(self, name: str) -> "RemoteDir":
        return RemoteDir(join(self.url, name), self.store)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return redact(self.url)


def upload_tree(local: str | Path, url: str, options: dict, stats: StoreStats) -> list[str]:
    """Every file under ``local`` to the same relative name under the prefix ``url`` (each put
    retried); manifests and ``classes.json`` go last, so a reader never finds a manifest before
    the shards it lists. Returns the URLs written."""
    local = Path(local)
    files = sorted((p for p in local.rglob("*") if p.is_file()),
                   key=lambda p: (p.name in ("manifest.json", "classes.json"), p.as_posix()))
    written = []
    for path in files:
        target = join(url, path.relative_to(local).as_posix())
        fs, remote = filesystem(target, options)
        retrying(lambda: fs.put_file(str(path), remote), target, stats, "write")
        written.append(target)
    return written


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def index_dir(url: str, config: StoreConfig) -> Path:
    """Where the index files and ``classes.json`` of the shards under ``url`` are mirrored."""
    tag = hashlib.sha1(redact(url).rstrip("/").encode()).hexdigest()[:12]
    return Path(config.cache_dir) / "index" / tag


def mirror(url: str, local: Path, options: dict, stats: StoreStats) -> Path:
    """The small object ``url`` (an index, ``classes.json``) copied to ``local`` (atomically)."""
    _atomic_write(local, read_object(url, options, stats))
    return local


class ShardCache:
    """Whole shards under ``root/shards``, at most ``limit`` bytes, least recently used evicted.

    Several processes may share ``root``: a lock file serialises the accounting; a download
    reserves its full size first (its partial file is sized up front, so it counts), then
    writes without the lock and is renamed into place. A shard evicted while a reader still
    has it open stays readable through that reader's file descriptor (POSIX unlink).
    """

    WAIT_S = 600.0  # how long a download waits for room that other downloads hold

    def __init__(self, root: str | Path, limit: int, options: dict | None = None, stats: StoreStats | None = None):
        self.root = Path(root) / "shards"
        self.root.mkdir(parents=True, exist_ok=True)
        self.limit = int(limit)
        self.options = dict(options or {})
        self.stats = stats or StoreStats()

    def local_path(self, url: str) -> Path:
        tag = hashlib.sha1(redact(url).encode()).hexdigest()[:16]
        return self.root / f"{tag}-{Path(urlsplit(url).path).name}"

    @contextlib.contextmanager
    def _locked(self):
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def usage(self) -> int:
        """Bytes the cache holds: finished shards plus the reservations of downloads in progress."""
        total = 0
        for entry in os.scandir(self.root):
            if entry.name != ".lock" and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def held(self) -> int:
        """:meth:`usage` under the lock: a consistent count while other processes download."""
        with self._locked():
            return self.usage()

    def _make_room(self, size: int) -> bool:
        """Evict least recently used shards until ``size`` more bytes fit; False if reservations
        of other downloads leave too little (the caller waits). Called under the lock."""
        used = self.usage()
        if used + size <= self.limit:
            return True
        done = []
        for entry in os.scandir(self.root):
            if entry.name != ".lock" and not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    done.append((st.st_mtime_ns, entry.path, st.st_size))
        for _, path, nbytes in sorted(done):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                used -= nbytes
                self.stats.evictions += 1
            if used + size <= self.limit:
                return True
        return False

    def fetch(self, url: str, size: int | None = None) -> str:
        """The local path of the shard at ``url``, downloaded first when not cached."""
        local = self.local_path(url)
        with self._locked():
            if local.exists():
                os.utime(local)  # most recently used
                self.stats.cache_hits += 1
                return str(local)
        if size is None:
            fs, path = filesystem(url, self.options)
            size = int(retrying(lambda: fs.info(path), url, self.stats)["size"])
        if size > self.limit:
            raise DataError(f"shard is {size} bytes, more than data.cache_limit ({self.limit} bytes): raise the "
                            "limit to at least the largest shard", shard=redact(url))
        part = self.root / f".{local.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.part"
        deadline = time.monotonic() + self.WAIT_S
        while True:
            with self._locked():
                if local.exists():  # another process finished it meanwhile
                    os.utime(local)
                    self.stats.cache_hits += 1
                    return str(local)
                if self._make_room(size):
                    with open(part, "wb") as fh:
                        fh.truncate(size)  # the reservation: counted by usage() from now on
                    break
            if time.monotonic() > deadline:
                raise DataError(f"no room in the shard cache {self.root} ({self.limit} bytes) within "
                                f"{self.WAIT_S:.0f} s: other downloads hold it", shard=redact(url))
            time.sleep(0.05)
        try:
            with open(part, "r+b") as fh:
                for start in range(0, size, CHUNK):
                    fh.write(read_range(url, self.options, self.stats, start, min(size, start + CHUNK)))
            with self._locked():  # the accounting sees the reservation or the shard, never both
                os.replace(part, local)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise
        self.stats.downloads += 1
        self.stats.bytes_downloaded += size
        return str(local)


_CACHES: dict[StoreConfig, ShardCache] = {}
PROCESS_STATS = StoreStats()  # everything this process did with the store (listing, readers)


def process_stats() -> dict:
    """:data:`PROCESS_STATS` as a dict (what an actor reports for the run summary)."""
    return PROCESS_STATS.as_dict()


def stats_since(before: dict) -> dict:
    """This process's object-store counts since ``before`` (a :meth:`StoreStats.as_dict`)."""
    now = PROCESS_STATS.as_dict()
    out = {k: now[k] - before[k] for k in now if k != "last_errors"}
    out["last_errors"] = [e for e in now["last_errors"] if e not in before["last_errors"]]
    return out


def shard_cache(config: StoreConfig) -> ShardCache:
    if config not in _CACHES:
        _CACHES[config] = ShardCache(config.cache_dir, config.cache_limit, config.options, PROCESS_STATS)
    return _CACHES[config]
