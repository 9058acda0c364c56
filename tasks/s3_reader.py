"""Whole-object reads from S3 through obstore (Rust's object_store), configured as s3fs is.

Reading a 110 KB image through s3fs (aiobotocore) costs about 2.7 ms of CPU, more than
decoding it; obstore reads it with about 0.3 ms (docs/benchmarks.md, "Reading from an object
store"). Only reading goes this way: listing, writing and every error stay with s3fs. An object
this reader fails on is read again by s3fs (``tasks.storage.read_many``), whose answer, bytes or
error, is the one used, so this reader can make a read cheaper but never changes its result.

It takes over only what it reproduces exactly: the endpoint, region, profile and credentials
that s3fs resolves through botocore. With any other s3fs setting (requester pays, object
versions, extra request arguments such as SSE-C keys, a ready-made session, botocore settings
beyond timeouts and the pool) s3fs reads everything, as it does where obstore is not installed
or ``DEIT_S3_READER=s3fs`` is in the workers' environment.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

_CLIENT_KEYS = {"endpoint_url", "region_name"}
_CONFIG_KEYS = {"max_pool_connections", "connect_timeout", "read_timeout"}
_EXTRA_KEYS = {"profile", "use_listings_cache", "skip_instance_cache", "listings_expiry_time", "max_paths"}
# A request is retried twice here and then handed to s3fs, which has its own retries: obstore's
# default (10 retries over up to 3 minutes) would hold a batch long before s3fs saw the object.
_RETRY = {"max_retries": 2, "retry_timeout": timedelta(seconds=20)}
# How long frozen refreshable credentials (an assumed role, SSO) are used before botocore is asked
# again; botocore itself refreshes them ahead of their expiry.
_CREDENTIAL_TTL = timedelta(minutes=5)

# obstore is turned off when s3fs recovered at least half of the last JUDGED objects it tried,
# once it has tried MIN_JUDGED: one object of a batch's last short span failing once turned
# it off for the process (a tenfold read CPU from then on)
JUDGED, MIN_JUDGED = 32, 8

ENV = "DEIT_S3_READER"  # "s3fs": s3fs reads every object; unset or "obstore": this reader where it can

_readers: dict[str, "S3Reader | None"] = {}
_lock = threading.Lock()


class S3Reader:
    """Reads whole objects of one s3fs filesystem's buckets concurrently through obstore."""

    def __init__(self, client: Any, credentials: Any, anon: bool, custom_endpoint: bool, config: dict[str, Any]):
        self.client, self.credentials, self.anon, self.custom_endpoint = client, credentials, anon, custom_endpoint
        self.threads = int(config.get("max_pool_connections") or 10)
        # botocore's timeouts, where set, as obstore's (else obstore's own: 5 s to connect, 30 s in all)
        self.client_options = {name: timedelta(seconds=float(config[key]))
                               for key, name in (("connect_timeout", "connect_timeout"), ("read_timeout", "timeout"))
                               if config.get(key) is not None}
        self.enabled = True
        self.recent: deque[bool] = deque(maxlen=JUDGED)  # the last objects tried: did s3fs recover it?
        self._stores: dict[str, Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def read(self, paths: dict[str, str]) -> dict[str, bytes | Exception]:
        """For each name, the bytes of its ``bucket/key`` path or the exception reading it raised.

        Never raises: the objects are read concurrently, on as many threads as s3fs's pool has
        connections.
        """
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="s3-read")
        return dict(zip(paths, self._pool.map(self._read_one, paths.values())))

    @staticmethod
    def readable(path: str) -> bool:
        """Whether obstore reads exactly the ``bucket/key`` ``path``.

        object_store's paths drop a key's leading or trailing '/' and refuse empty segments, so
        it would read ``/a.jpg`` as ``a.jpg``, another object; such keys are s3fs's. Keys it
        cannot parse (``.`` or ``..`` segments, control characters) raise, and s3fs reads them.
        """
        key = path.partition("/")[2]
        return (bool(key) and key[0] != "/" and key[-1] != "/" and "//" not in key
                and not {".", ".."} & set(key.split("/")))

    def record(self, recovered: list[bool]) -> tuple[int, int, bool]:
        """Note, for each object this reader tried, whether s3fs read it after this reader failed.

        Returns (failed, tried) over the last JUDGED objects, and whether that is enough to
        leave every later read to s3fs: half of them, once MIN_JUDGED were tried.
        """
        with self._lock:
            self.recent.extend(recovered)
            failed, tried = sum(self.recent), len(self.recent)
        return failed, tried, tried >= MIN_JUDGED and 2 * failed >= tried

    def disable(self, reason: str) -> None:
        """Leave every later read to s3fs, saying why once."""
        if self.enabled:
            self.enabled = False
            logger.warning("reading S3 objects through s3fs from now on: %s", reason)

    def _read_one(self, path: str) -> bytes | Exception:
        import obstore

        bucket, _, key = path.partition("/")
        try:
            return bytes(obstore.get(self._store(bucket), key).bytes())
        except Exception as exc:  # noqa: BLE001 - s3fs reads it again and its answer is used
            return exc

    def _store(self, bucket: str):
        with self._lock:
            store = self._stores.get(bucket)
            if store is None:
                store = self._stores[bucket] = self._make_store(bucket)
            return store

    def _make_store(self, bucket: str):
        from obstore.store import S3Store

        endpoint = self.client.meta.endpoint_url
        region = self.client.meta.region_name if self.custom_endpoint else _bucket_region(self.client, bucket)
        options: dict[str, Any] = {"region": region or "us-east-1"}
        # always named: left out, object_store takes AWS_ENDPOINT from the environment, which
        # botocore ignores, and would read another server's object of the same name
        options["endpoint"] = endpoint if self.custom_endpoint else f"https://s3.{options['region']}.amazonaws.com"
        if self.anon:
            options["skip_signature"] = True
        provider = None if self.anon else self._credential
        return S3Store(bucket, client_options={**self.client_options, "allow_http": endpoint.startswith("http://")},
                       retry_config=_RETRY, credential_provider=provider, **options)

    def _credential(self) -> dict[str, Any]:
        frozen = self.credentials.get_frozen_credentials()
        refreshes = hasattr(self.credentials, "refresh_needed")
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token,
                "expires_at": datetime.now(timezone.utc) + _CREDENTIAL_TTL if refreshes else None}


def _bucket_region(client: Any, bucket: str) -> str | None:
    """The bucket's own region on AWS (S3 answers a request signed for another one with a redirect)."""
    try:
        meta = client.head_bucket(Bucket=bucket)["ResponseMetadata"]
    except Exception as exc:  # noqa: BLE001 - a 301 or 403 still names the region
        meta = getattr(exc, "response", {}).get("ResponseMetadata", {})
    return meta.get("HTTPHeaders", {}).get("x-amz-bucket-region") or client.meta.region_name


def reader_for(fs: Any) -> S3Reader | None:
    """The obstore reader for ``fs``, made once per filesystem; None if s3fs must read it all."""
    token = getattr(fs, "_fs_token", None)
    if token is None or type(fs).__module__.split(".")[0] != "s3fs" or os.environ.get(ENV) == "s3fs":
        return None
    with _lock:
        if token not in _readers:
            _readers[token] = _make_reader(fs)
        reader = _readers[token]
    return reader if reader is not None and reader.enabled else None


def _make_reader(fs: Any) -> S3Reader | None:
    why = _unsupported(fs)
    if why is None:
        try:
            import obstore  # noqa: F401
        except ImportError:
            why = "obstore is not installed"
    if why is not None:
        logger.debug("s3fs reads %s: %s", fs.storage_options, why)
        return None
    import botocore.config
    import botocore.credentials
    import botocore.session

    session = botocore.session.Session(profile=fs.kwargs.get("profile"))
    config = botocore.config.Config(**fs.config_kwargs) if fs.config_kwargs else None
    # botocore resolves the endpoint (AWS_ENDPOINT_URL included) and region as s3fs's client does
    endpoint = fs.endpoint_url or fs.client_kwargs.get("endpoint_url")
    client = session.create_client("s3", region_name=fs.client_kwargs.get("region_name"), endpoint_url=endpoint,
                                   config=config)
    if fs.key and fs.secret:
        credentials = botocore.credentials.Credentials(fs.key, fs.secret, fs.token)
    else:
        credentials = None if fs.anon else session.get_credentials()
        if credentials is None and not fs.anon:
            return None  # s3fs raises NoCredentialsError, translated at the boundary
    # only S3's standard endpoints are AWS's default: FIPS, dual-stack or a VPC endpoint is named
    host = urlparse(client.meta.endpoint_url).hostname or ""
    custom = host not in ("s3.amazonaws.com", f"s3.{client.meta.region_name}.amazonaws.com")
    return S3Reader(client, credentials, bool(fs.anon), custom, fs.config_kwargs)


def _unsupported(fs: Any) -> str | None:
    """Why s3fs must read everything for ``fs`` (a setting obstore would not honour), or None."""
    # the constructor's own arguments: s3fs sets fs.session itself once it connects
    if fs.requester_pays or fs.version_aware or fs.s3_additional_kwargs or fs.storage_options.get("session"):
        return "requester pays, object versions, extra request arguments or a session are set"
    if not fs.use_ssl and not (fs.endpoint_url or fs.client_kwargs.get("endpoint_url")):
        return "use_ssl=False without an endpoint"
    extra = (set(fs.client_kwargs) - _CLIENT_KEYS) | (set(fs.config_kwargs) - _CONFIG_KEYS) | (set(fs.kwargs) - _EXTRA_KEYS)
    return f"settings only s3fs knows: {sorted(extra)}" if extra else None
