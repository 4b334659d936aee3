"""Bronze on Azure Data Lake Storage Gen2, streamed and published atomically.

A partition is uploaded while it is being produced: the compressor hands fixed-size blocks
to `write`, a bounded queue feeds one background thread that `append_data`s them at
increasing positions, and `close` issues the single `flush_data` that commits them (until
then the service keeps appended data invisible). Publishing is one server-side
`rename_file` (`PUT` with `x-ms-rename-source`) onto the final path, replacing the previous
version. Memory is bounded by block size × queue depth, whatever the partition's size.

We do not use `upload_data`: its default chunk is 100 MiB per append and a non-seekable
stream needs its length up front. Create, append, flush, rename, delete and listing go to
the DFS endpoint; reads and properties go through the Blob endpoint, as the SDK does.

Credentials: a connection string, account key or SAS token from an environment variable,
or `DefaultAzureCredential` (managed identity, workload identity, az login). Secrets never
appear in errors: messages name the account, filesystem and path, the status and the
service's error code, and are scrubbed of anything secret before they are raised.
"""

import hashlib
import ipaddress
import os
import queue
import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.filedatalake import (
    ContentSettings,
    DataLakeFileClient,
    DataLakeServiceClient,
    ExponentialRetry,
)

from pg_assets.sinks.base import FileInfo, Published, Sink, StagingFile, staging_relpath

AUTH_MODES = ("connection_string", "account_key", "sas", "default_credential")
_ABFSS = re.compile(
    r"^abfss://(?P<fs>[^@/]+)@(?P<account>[^./]+)\.dfs\.(?P<suffix>[^/]+?)(?:/(?P<prefix>.*))?$"
)
_SECRETISH = re.compile(r"(sig|AccountKey|SharedAccessSignature)=[^&;\s]+", re.I)


class AdlsError(RuntimeError):
    """An ADLS operation failed for good (after the SDK's retries)."""


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


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


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


class _Uploader(StagingFile):
    """A staging file fed by a background appender thread through a bounded queue."""

    def __init__(self, sink: "AdlsSink", relpath: str, content_type: str) -> None:
        self.sink = sink
        self.relpath = relpath
        self.client: DataLakeFileClient = sink._fs.get_file_client(sink._full(relpath))
        self.content_type = content_type
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=sink.queue_depth)
        self._position = 0
        self._md5 = hashlib.md5()
        self._error: BaseException | None = None
        self._closed = False
        sink._call("create", relpath, self.client.create_file,
                   content_settings=ContentSettings(content_type=content_type))  # fmt: skip
        self._thread = threading.Thread(target=self._run, name="pg_assets-adls-append", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the producer learns of the error on its next write
            try:
                self.sink._call("append", self.relpath, self.client.append_data,
                                block, offset=self._position, length=len(block))  # fmt: skip
                self._position += len(block)
                self._md5.update(block)
            except BaseException as e:
                self._error = e

    def write(self, block: bytes, /) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(block)

    def _stop(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def close(self) -> None:
        if self._closed:
            return
        self._stop()
        if self._error is not None:
            raise self._error
        settings = ContentSettings(content_type=self.content_type, content_md5=self._md5.digest())
        self.sink._call("flush", self.relpath, self.client.flush_data,
                        self._position, content_settings=settings)  # fmt: skip


class AdlsSink(Sink):
    def __init__(
        self,
        location: AdlsLocation,
        service: DataLakeServiceClient,
        *,
        create_filesystem: bool = False,
        queue_depth: int = 4,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.location = location
        self.root_uri = location.uri
        self.queue_depth = queue_depth
        self._secrets = tuple(s for s in secrets if s)
        self._fs = service.get_file_system_client(location.filesystem)
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
        scheme, host = urlsplit(account_url).scheme, urlsplit(account_url).hostname
        if scheme != "https" and not _is_loopback(host):
            raise ValueError(
                f"bronze.adls.endpoint {account_url!r} must use https (plain http is only "
                "allowed on loopback, for emulators and test servers)"
            )
        options: dict[str, Any] = {
            "retry_policy": ExponentialRetry(
                initial_backoff=retry_backoff_s,
                increment_base=retry_backoff_base,
                retry_total=max_retries,
                random_jitter_range=min(3, retry_backoff_s),
            ),
            "connection_timeout": min(timeout_s, 20),
            "read_timeout": timeout_s,
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
        return cls(
            location,
            service,
            create_filesystem=create_filesystem,
            queue_depth=queue_depth,
            secrets=(secret,),
        )

    # -- helpers ----------------------------------------------------------------------------

    def _full(self, relpath: str) -> str:
        return f"{self.location.prefix}/{relpath}" if self.location.prefix else relpath

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return _SECRETISH.sub(r"\1=***", text)

    def _call(self, op: str, relpath: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AzureError as e:
            where = (
                f"account {self.location.account}, filesystem {self.location.filesystem}, "
                f"path {self._full(relpath) or '/'}"
            )
            if isinstance(e, HttpResponseError):
                code = getattr(e.error_code, "value", e.error_code)
                if not code and e.response is not None:
                    code = e.response.headers.get("x-ms-error-code")
                detail = f"HTTP {e.status_code} {code or ''}".strip()
                if code in ("FilesystemNotFound", "ContainerNotFound"):
                    detail += " (the filesystem does not exist; create it or set bronze.adls.create_filesystem: true)"
                elif e.status_code == 403:
                    detail += " (the credential is not allowed to do this; check its role or SAS permissions)"
            else:
                detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise AdlsError(self._scrub(f"ADLS {op} failed for {where}: {detail}")) from e

    # -- Sink -------------------------------------------------------------------------------

    def open_staging(self, run_id: str, relpath: str, content_type: str) -> _Uploader:
        return _Uploader(self, staging_relpath(run_id, relpath), content_type)

    def publish(self, staging: StagingFile, relpath: str, *, expected_size: int) -> Published:
        assert isinstance(staging, _Uploader)
        staging.close()
        if staging._position != expected_size:
            raise AdlsError(
                f"staged {relpath}: {staging._position} bytes, expected {expected_size}"
            )
        folder = relpath.rsplit("/", 1)[0] if "/" in relpath else ""
        if folder:
            dir_client = self._fs.get_directory_client(self._full(folder))
            try:
                self._call("create directory", folder, dir_client.create_directory,
                           if_none_match="*")  # fmt: skip
            except AdlsError as e:
                if not isinstance(e.__cause__, ResourceExistsError):
                    raise
        target = f"{self.location.filesystem}/{self._full(relpath)}"
        published = self._call("rename", relpath, staging.client.rename_file, target)
        # the etag readers will see is the published file's own, so ask for it
        props = self._call("properties", relpath, published.get_file_properties)
        return Published(uri=self.uri(relpath), size=props.size, etag=props.etag)

    def discard(self, staging: StagingFile) -> None:
        assert isinstance(staging, _Uploader)
        staging._stop()
        try:
            self._call("delete staging", staging.relpath, staging.client.delete_file)
        except AdlsError:
            pass  # never created, or already gone; nothing to clean

    def delete(self, relpath: str) -> None:
        try:
            self._call("delete", relpath, self._fs.get_file_client(self._full(relpath)).delete_file)
        except AdlsError as e:
            if not isinstance(e.__cause__, ResourceNotFoundError):
                raise

    def stat(self, relpath: str) -> FileInfo | None:
        client = self._fs.get_file_client(self._full(relpath))
        try:
            props = self._call("properties", relpath, client.get_file_properties)
        except AdlsError as e:
            if isinstance(e.__cause__, ResourceNotFoundError):
                return None
            raise
        return FileInfo(props.size, props.etag)

    def read_bytes(self, relpath: str) -> bytes:
        client = self._fs.get_file_client(self._full(relpath))
        return self._call("read", relpath, lambda: client.download_file().readall())

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
