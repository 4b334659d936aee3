"""Bronze on Azure Data Lake Storage Gen2, streamed and published atomically.

A partition is uploaded while it is being produced: the compressor hands fixed-size blocks
to `write`, a bounded `Handoff` queue feeds one background thread that `append_data`s them
at increasing positions, and `close` issues the single `flush_data` that commits them (until
then the service keeps appended data invisible), then reads back the length the service
holds. Publishing checks that length against the bytes the core produced and is one
server-side `rename_file` (`PUT` with `x-ms-rename-source`) onto the final path, replacing
the previous version. Memory is bounded by block size × queue depth, whatever the size.

No wait is unbounded: the appender's queue is a `Handoff` (a failed append reaches the
writer at its next block or at `close`; an appender silent for longer than every retry of
one request could take fails with `Stalled`), and every request has the SDK's connection
and read timeouts and a finite number of retries.

Lost responses (the service applied a request, the connection dropped before the answer):
a flush, rename or delete that fails is checked against what the service holds before it
is reported. A rename whose staging file is gone and whose destination holds the staged
length and MD5 succeeded; a delete whose path is gone succeeded. Only when that check
fails too does the sink raise `PublishUncertain`.

The DFS rename needs the destination's parent directory to exist (the service answers
404 `RenameDestinationParentPathNotFound`; creating a file, by contrast, creates its
parents). So a publish creates the folder once, before its first rename into that folder
(one round trip, cached per sink), and again only if the rename reports it missing.

We do not use `upload_data`: its default chunk is 100 MiB per append and a non-seekable
stream needs its length up front. Create, append, flush, rename, delete and listing go to
the DFS endpoint; reads and properties go through the Blob endpoint, as the SDK does.

Credentials: a connection string, account key or SAS token from an environment variable,
or `DefaultAzureCredential` (managed identity, workload identity, az login). Secrets never
appear in errors: messages name the account, filesystem and path, the status and the
service's error code, and are scrubbed of anything secret before they are raised.
"""

import datetime as dt
import hashlib
import ipaddress
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.filedatalake import (
    ContentSettings,
    DataLakeFileClient,
    DataLakeServiceClient,
    ExponentialRetry,
)

from pg_assets.core.handoff import Handoff
from pg_assets.sinks.base import (
    STAGING_DIR,
    FileInfo,
    Published,
    PublishUncertain,
    Sink,
    SinkError,
    StagingFile,
    precondition_failed,
    size_mismatch,
    staging_relpath,
)

AUTH_MODES = ("connection_string", "account_key", "sas", "default_credential")
_ABFSS = re.compile(
    r"^abfss://(?P<fs>[^@/]+)@(?P<account>[^./]+)\.dfs\.(?P<suffix>[^/]+?)(?:/(?P<prefix>.*))?$"
)
_SECRETISH = re.compile(r"(sig|AccountKey|SharedAccessSignature)=[^&;\s]+", re.I)
DOWNLOAD_CHUNK = 4 << 20  # download size per request: bounds open_read's memory
RETRY_JITTER = 0.2  # each retry wait is its nominal value × uniform(0.8, 1.2)
_PARENT_MISSING = "RenameDestinationParentPathNotFound"


class AdlsError(SinkError):
    """An ADLS operation failed for good (after the SDK's retries)."""


class AdlsNotFound(AdlsError, FileNotFoundError):
    """The path does not exist (a read of a missing file)."""


@dataclass(frozen=True)
class AdlsLocation:
    account: str
    filesystem: str
    prefix: str
    endpoint_suffix: str = "core.windows.net"

    @classmethod
    def parse(cls, uri: str) -> "AdlsLocation":
        m = _ABFSS.match(uri)
        if not m:
            raise ValueError(
                f"Bronze root {uri!r} is not an ADLS Gen2 URI; expected "
                "abfss://<filesystem>@<account>.dfs.core.windows.net/<prefix>"
            )
        return cls(m["account"], m["fs"], (m["prefix"] or "").strip("/"), m["suffix"])

    @property
    def uri(self) -> str:
        base = f"abfss://{self.filesystem}@{self.account}.dfs.{self.endpoint_suffix}"
        return f"{base}/{self.prefix}" if self.prefix else base


class RetryPolicy(ExponentialRetry):
    """The SDK's storage retry policy with the settings' documented meaning.

    `ExponentialRetry` caps status retries at 3 whatever `retry_total` says (its
    `retry_status` default) and waits `initial_backoff + base**n` before retry n, so the first
    wait is not `initial_backoff`. Here `max_retries` bounds connection errors, read errors
    (including a dropped response) and retryable statuses (408, 5xx but 501/505) alike, and
    retry n (1-based) waits `backoff_s * base**(n-1)` seconds × a uniform jitter of ±20 %.
    """

    def __init__(self, max_retries: int, backoff_s: float, base: float) -> None:
        super().__init__(
            initial_backoff=backoff_s,  # type: ignore[arg-type]
            increment_base=base,  # type: ignore[arg-type]
            retry_total=max_retries,
            random_jitter_range=0,
            retry_connect=max_retries,
            retry_read=max_retries,
            retry_status=max_retries,
        )
        self.backoff_s = backoff_s
        self.base = base

    def nominal_wait(self, retry: int) -> float:
        """Seconds before retry number `retry` (1-based), before jitter."""
        return self.backoff_s * self.base ** (retry - 1)

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        # the policy increments `count` before sleeping: count == 1 before the first retry
        wait = self.nominal_wait(max(settings["count"], 1))
        return wait * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _require_https(url: str, setting: str) -> None:
    parts = urlsplit(url)
    if parts.scheme != "https" and not _is_loopback(parts.hostname):
        raise ValueError(
            f"{setting} resolves to {parts.scheme}://{parts.netloc}, which must use https "
            "(plain http is only allowed on loopback, for emulators and test servers)"
        )


def _read_secret(env: str | None, auth: str) -> str:
    if not env:
        raise ValueError(
            f"bronze.adls.secret_env must name the environment variable for auth {auth!r}"
        )
    value = os.environ.get(env)
    if not value:
        raise ValueError(
            f"environment variable {env} (bronze.adls.secret_env, auth {auth!r}) is not set"
        )
    return value


def _error_code(e: BaseException) -> str | None:
    cause = e.__cause__ if isinstance(e, AdlsError) else e
    if isinstance(cause, HttpResponseError):
        code = getattr(cause.error_code, "value", cause.error_code)
        if not code and cause.response is not None:
            code = cause.response.headers.get("x-ms-error-code")
        return code
    return None


def _parent(relpath: str) -> str:
    return relpath.rsplit("/", 1)[0] if "/" in relpath else ""


class _Uploader(StagingFile):
    """A staging file fed by a background appender thread through a bounded hand-off."""

    def __init__(self, sink: "AdlsSink", relpath: str, target: str, content_type: str) -> None:
        self.sink = sink
        self.relpath = relpath
        self.target = target
        self.client: DataLakeFileClient = sink._fs.get_file_client(sink._full(relpath))
        self.content_type = content_type
        self.info: FileInfo | None = None  # what the service holds, once closed
        self._position = 0
        self._md5 = hashlib.md5()
        self._handoff = Handoff(
            sink.queue_depth, what=f"the ADLS appender of {target}", stall_s=sink.stall_s
        )
        settings = ContentSettings(content_type=content_type)
        try:
            sink._call("create", target, self.client.create_file,
                       content_settings=settings, staged_at=relpath)  # fmt: skip
        except BaseException:
            sink._delete_quietly(relpath)  # a lost response may have left it behind
            sink._remove_staging_dir()
            raise
        self._handoff.start(self._run, name="pg_assets-adls-append")

    @property
    def md5(self) -> bytes:
        return self._md5.digest()

    def _run(self) -> None:
        while (block := self._handoff.get()) is not None:
            self.sink._call("append", self.target, self.client.append_data, block,
                            offset=self._position, length=len(block),
                            staged_at=self.relpath)  # fmt: skip
            self._position += len(block)
            self._md5.update(block)
            self._handoff.touch()

    def write(self, block: bytes, /) -> None:
        if self.info is not None or self._handoff.aborted:
            raise AdlsError(f"staging file {self.relpath} of {self.target} is already closed")
        self._handoff.put(block)

    def close(self) -> int:
        if self.info is not None:
            return self.info.size
        if self._handoff.aborted:
            raise AdlsError(f"staging file {self.relpath} of {self.target} was discarded")
        self._handoff.put(None)
        self._handoff.finish()  # every append done, or the appender's error raised
        settings = ContentSettings(content_type=self.content_type, content_md5=self.md5)
        try:
            self.sink._call("flush", self.target, self.client.flush_data, self._position,
                            content_settings=settings, staged_at=self.relpath)  # fmt: skip
        except AdlsError as e:
            # a lost response: the service may have committed the flush all the same
            held = self.sink._stat_or(e, self.relpath)
            if held is None or held.size != self._position or held.content_md5 != self.md5:
                raise
        # the size the service holds, not the count we kept
        info = self.sink.stat(self.relpath)
        if info is None:
            raise AdlsError(f"staging file {self.sink._full(self.relpath)} vanished after flush")
        self.info = info
        return info.size

    def abandon(self) -> None:
        self._handoff.abort(grace_s=self.sink.abort_grace_s)


class AdlsSink(Sink):
    def __init__(
        self,
        location: AdlsLocation,
        service: DataLakeServiceClient,
        *,
        create_filesystem: bool = False,
        queue_depth: int = 4,
        secrets: tuple[str, ...] = (),
        stall_s: float = 900.0,
        abort_grace_s: float = 10.0,
    ) -> None:
        self.location = location
        self.root_uri = location.uri
        self.queue_depth = queue_depth
        self.stall_s = stall_s
        self.abort_grace_s = abort_grace_s
        self._secrets = tuple(s for s in secrets if s)
        self._fs = service.get_file_system_client(location.filesystem)
        self._dirs: set[str] = set()  # folders known to exist (created or seen by this sink)
        if create_filesystem:
            try:
                self._call("create filesystem", "", self._fs.create_file_system)
            except AdlsError as e:
                if not isinstance(e.__cause__, ResourceExistsError):
                    raise

    @classmethod
    def from_uri(
        cls,
        uri: str,
        *,
        auth: str = "default_credential",
        secret_env: str | None = None,
        endpoint: str | None = None,
        create_filesystem: bool = False,
        max_retries: int = 5,
        retry_backoff_s: float = 2.0,
        retry_backoff_base: float = 2.0,
        queue_depth: int = 4,
        timeout_s: float = 120,
    ) -> "AdlsSink":
        location = AdlsLocation.parse(uri)
        if auth not in AUTH_MODES:
            raise ValueError(f"bronze.adls.auth {auth!r} is not one of {AUTH_MODES}")
        account_url = endpoint or f"https://{location.account}.dfs.{location.endpoint_suffix}"
        if endpoint:
            _require_https(account_url, "bronze.adls.endpoint")
        connect_s = min(timeout_s, 20)
        options: dict[str, Any] = {
            "retry_policy": RetryPolicy(max_retries, retry_backoff_s, retry_backoff_base),
            "connection_timeout": connect_s,
            "read_timeout": timeout_s,
            "max_single_get_size": DOWNLOAD_CHUNK,
            "max_chunk_get_size": DOWNLOAD_CHUNK,
        }
        secret = ""
        if auth == "connection_string":
            if endpoint:
                raise ValueError(
                    "bronze.adls.endpoint cannot be combined with auth 'connection_string'; "
                    "put the endpoint in the connection string (BlobEndpoint=...)"
                )
            secret = _read_secret(secret_env, auth)
            service = DataLakeServiceClient.from_connection_string(secret, **options)
        else:
            credential: Any
            if auth == "account_key":
                secret = _read_secret(secret_env, auth)
                credential = {"account_name": location.account, "account_key": secret}
            elif auth == "sas":
                secret = _read_secret(secret_env, auth).lstrip("?")
                credential = secret
            else:
                from azure.identity import DefaultAzureCredential

                credential = DefaultAzureCredential()
            service = DataLakeServiceClient(account_url, credential=credential, **options)
        # the URLs the client will really call (a connection string's BlobEndpoint/DfsEndpoint)
        setting = "the connection string's endpoint" if auth == "connection_string" else (
            "bronze.adls.endpoint" if endpoint else "the account URL"
        )  # fmt: skip
        _require_https(service.url, setting)
        _require_https(getattr(service, "_blob_account_url", None) or service.url, setting)
        # one request can take up to (retries + 1) × (connect + read timeout) plus the waits
        waits = sum(retry_backoff_s * retry_backoff_base**i for i in range(max_retries))
        stall_s = (max_retries + 1) * (connect_s + timeout_s) + waits * 1.2 + 30
        return cls(
            location,
            service,
            create_filesystem=create_filesystem,
            queue_depth=queue_depth,
            secrets=(secret,),
            stall_s=stall_s,
        )

    # -- helpers ----------------------------------------------------------------------------

    def _full(self, relpath: str) -> str:
        if not relpath:
            return self.location.prefix
        return f"{self.location.prefix}/{relpath}" if self.location.prefix else relpath

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return _SECRETISH.sub(r"\1=***", text)

    def _error(
        self, op: str, relpath: str, e: AzureError, staged_at: str | None = None
    ) -> AdlsError:
        where = f"account {self.location.account}, filesystem {self.location.filesystem}"
        if staged_at is not None:
            where += f", staging file {self._full(staged_at)}"
        code = _error_code(e)
        if isinstance(e, HttpResponseError):
            detail = f"HTTP {e.status_code} {code or ''}".strip()
            if code in ("FilesystemNotFound", "ContainerNotFound"):
                detail += " (the filesystem does not exist; create it or set bronze.adls.create_filesystem: true)"
            elif code == "AuthenticationFailed":
                detail += (
                    " (the service rejected the signature: check the account key or SAS token)"
                )
            elif e.status_code == 403:
                detail += (
                    " (the credential is not allowed to do this; check its role or SAS permissions)"
                )
        else:
            detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        kind = AdlsNotFound if isinstance(e, ResourceNotFoundError) else AdlsError
        message = f"ADLS {op} of {self._full(relpath) or '/'} failed ({where}): {detail}"
        return kind(self._scrub(message))

    def _call(
        self, op: str, relpath: str, fn: Any, *args: Any, staged_at: str | None = None, **kw: Any
    ) -> Any:
        """Call the SDK; errors become AdlsError naming the destination (and staging file)."""
        try:
            return fn(*args, **kw)
        except AzureError as e:
            raise self._error(op, relpath, e, staged_at) from e

    def _stat_or(self, error: AdlsError, relpath: str) -> FileInfo | None:
        """`stat` for checking a failed request; if the check fails too, the outcome is
        unknown and `error` is raised as PublishUncertain."""
        try:
            return self.stat(relpath)
        except AdlsError as check:
            raise PublishUncertain(
                f"{error}; checking what the service holds failed too: {check}"
            ) from error

    def _delete_quietly(self, relpath: str, **kw: Any) -> None:
        try:
            self._fs.get_file_client(self._full(relpath)).delete_file(**kw)
        except AzureError:
            pass

    def _remove_staging_dir(self) -> None:
        """Delete `_staging` if it is empty: non-recursive, so another writer's file keeps it
        (409 DirectoryNotEmpty) and nothing but an empty folder is ever removed."""
        self._delete_quietly(STAGING_DIR, recursive=False, retry_total=0)

    def _ensure_dir(self, folder: str) -> None:
        if not folder or folder in self._dirs:
            return
        client = self._fs.get_directory_client(self._full(folder))
        try:
            self._call("create directory", folder, client.create_directory, if_none_match="*")
        except AdlsError as e:
            if not isinstance(e.__cause__, ResourceExistsError):
                raise
        self._dirs.add(folder)

    def _rename(
        self, staging: _Uploader, relpath: str, if_match: str | None, if_none_match: bool
    ) -> None:
        target = f"{self.location.filesystem}/{self._full(relpath)}"
        condition: dict[str, Any] = {}
        if if_match is not None:  # the destination's conditions, checked by the service
            condition = {"etag": if_match, "match_condition": MatchConditions.IfNotModified}
        elif if_none_match:
            condition = {"match_condition": MatchConditions.IfMissing}
        self._call("rename", relpath, staging.client.rename_file, target,
                   staged_at=staging.relpath, **condition)  # fmt: skip

    # -- Sink -------------------------------------------------------------------------------

    def open_staging(self, run_id: str, relpath: str, content_type: str) -> _Uploader:
        return _Uploader(self, staging_relpath(run_id, relpath), relpath, content_type)

    def publish(
        self,
        staging: StagingFile,
        relpath: str,
        *,
        expected_size: int,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> Published:
        assert isinstance(staging, _Uploader)
        staged = staging.close()
        if staged != expected_size:
            raise size_mismatch(self._full(relpath), self._full(staging.relpath), staged,
                                expected_size)  # fmt: skip
        self._ensure_dir(_parent(relpath))
        held: FileInfo | None = None
        try:
            try:
                self._rename(staging, relpath, if_match, if_none_match)
            except AdlsError as e:
                if _error_code(e) != _PARENT_MISSING:
                    raise
                self._dirs.discard(_parent(relpath))  # deleted since we created it
                self._ensure_dir(_parent(relpath))
                self._rename(staging, relpath, if_match, if_none_match)
        except AdlsError as e:
            # a lost response? The rename happened if the staging file is gone and the
            # destination holds exactly what was staged.
            if self._stat_or(e, staging.relpath) is not None:
                if isinstance(e.__cause__, ResourceModifiedError | ResourceExistsError) and (
                    if_match is not None or if_none_match
                ):
                    held = self.stat(relpath)
                    raise precondition_failed(
                        self._full(relpath), if_match, held.etag if held else None
                    ) from e
                raise  # the staging file is still there: nothing was published
            held = self._stat_or(e, relpath)
            if held is None or held.size != staged or held.content_md5 != staging.md5:
                raise PublishUncertain(
                    f"{e}; the staging file is gone but {self._full(relpath)} does not hold it"
                ) from e
        if held is None:
            # the etag readers will see is the published file's own, so ask for it
            try:
                held = self.stat(relpath)
            except AdlsError as e:
                raise PublishUncertain(
                    f"renamed {self._full(staging.relpath)} onto {self._full(relpath)}, but "
                    f"reading its properties failed: {e}"
                ) from e
        if held is None or held.size != staged:
            raise PublishUncertain(
                f"renamed {self._full(staging.relpath)} onto {self._full(relpath)}, but the "
                f"service then reported {held.size if held else 'no file'} instead of "
                f"{staged} bytes there"
            )
        self._remove_staging_dir()
        return Published(uri=self.uri(relpath), size=held.size, etag=held.etag)

    def discard(self, staging: StagingFile) -> None:
        assert isinstance(staging, _Uploader)
        staging.abandon()
        self._delete_quietly(staging.relpath)  # never created, or already gone: fine
        self._remove_staging_dir()

    def delete(self, relpath: str) -> None:
        client = self._fs.get_file_client(self._full(relpath))
        try:
            self._call("delete", relpath, client.delete_file)
        except AdlsError as e:
            if isinstance(e.__cause__, ResourceNotFoundError):
                return  # missing, or our own retry after a lost response
            if self._stat_or(e, relpath) is not None:
                raise
            # gone: the failure was a lost response to a delete that happened

    def stat(self, relpath: str) -> FileInfo | None:
        client = self._fs.get_file_client(self._full(relpath))
        try:
            props = self._call("properties", relpath, client.get_file_properties)
        except AdlsNotFound:
            return None
        if (props.metadata or {}).get("hdi_isfolder") == "true":
            return None  # a directory
        md5 = props.content_settings.content_md5
        return FileInfo(size=props.size, etag=props.etag, content_md5=bytes(md5) if md5 else None)

    def read_bytes(self, relpath: str) -> bytes:
        client = self._fs.get_file_client(self._full(relpath))
        return self._call("read", relpath, lambda: client.download_file().readall())

    def open_read(self, relpath: str) -> Iterator[bytes]:
        client = self._fs.get_file_client(self._full(relpath))
        # max_single_get_size/max_chunk_get_size (DOWNLOAD_CHUNK) bound each request, and the
        # SDK pins the chunks to the first response's etag, so a replaced file fails the read
        # instead of mixing versions
        download = self._call("read", relpath, client.download_file, max_concurrency=1)

        def chunks() -> Iterator[bytes]:
            try:
                yield from download.chunks()
            except AzureError as e:
                raise self._error("read", relpath, e) from e

        return chunks()

    def list_files(self, prefix: str = "") -> list[str]:
        full = self._full(prefix).strip("/")
        strip = len(self.location.prefix) + 1 if self.location.prefix else 0

        def listing() -> list[str]:
            try:
                paths = self._fs.get_paths(path=full or None, recursive=True)
                return sorted(p.name[strip:] for p in paths if not p.is_directory)
            except ResourceNotFoundError:
                return []

        return self._call("list", prefix, listing)

    def staging_files(self) -> list[tuple[str, float | None]]:
        # The service's Last-Modified: set at create and at each flush (ours flushes once, at
        # close), so a file's age here is at most the time since its run created it.
        strip = len(self.location.prefix) + 1 if self.location.prefix else 0

        def when(modified: dt.datetime | None) -> float | None:
            if modified is None:
                return None
            if modified.tzinfo is None:  # the SDK parses RFC 1123 dates as naive UTC
                modified = modified.replace(tzinfo=dt.UTC)
            return modified.timestamp()

        def listing() -> list[tuple[str, float | None]]:
            try:
                paths = self._fs.get_paths(path=self._full(STAGING_DIR), recursive=False)
                return [(p.name[strip:], when(p.last_modified)) for p in paths
                        if not p.is_directory]  # fmt: skip
            except ResourceNotFoundError:
                return []

        return self._call("list", STAGING_DIR, listing)
