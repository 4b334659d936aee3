"""A protocol-level ADLS Gen2 test server for the requests the Azure SDK sends.

There is no official local emulator for the DFS endpoint (Azurite serves Blob only), so this
speaks just enough of both REST dialects, with the service's semantics where they matter to
us: appended data stays invisible until flushed, appends and flushes must come at the exact
position, a rename needs an existing source and replaces the destination, and errors carry
the service's codes (JSON bodies for DFS, XML for Blob, `x-ms-error-code` on both).

Authorization is checked as Azure Storage checks it, so a wrong key fails as it would in
Azure (403 AuthenticationFailed):
- SharedKey (Blob and DFS use the same scheme, version 2009-09-19 and later): the
  signature must be HMAC-SHA256, under the account key, of the string-to-sign of the
  "Authorize with Shared Key" documentation: VERB, Content-Encoding, Content-Language,
  Content-Length (empty when 0), Content-MD5, Content-Type, Date, If-Modified-Since,
  If-Match, If-None-Match, If-Unmodified-Since, Range, one line each, then the x-ms-
  headers (lowercase names, sorted, whitespace folded, `name:value\n`), then the
  canonicalized resource `/<account><encoded URI path>` followed by `\nname:value` for
  each query parameter (lowercase names, sorted; values decoded; several values sorted
  and comma-joined). `x-ms-date` (or `Date`) must be within 15 minutes of now.
- Account SAS (`sig` in the query, no `sr`): `sig` must be HMAC-SHA256, under the account
  key, of `account\nsp\nss\nsrt\nst\nse\nsip\nspr\nsv\n` (plus `ses\n` from signed version
  2020-12-06); expired or not-yet-valid tokens fail with AuthenticationFailed; the
  services (`ss` must include b), resource types (`srt`: c for filesystem operations, o
  for paths) and permissions (`sp`) must cover the operation. Service and user-delegation
  SAS are not supported and fail with AuthenticationFailed.

It records every request and the largest request body, and injects faults so tests can
drive the real SDK through real failures: an error status instead of the operation, or a
"lost response" (the operation is applied, then the connection is dropped unanswered).
URLs are IP-style, as for Azurite: http://127.0.0.1:<port>/<account>/<filesystem>/<path>.
"""

import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import io
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Azurite's published development key for devstoreaccount1 (public, not a secret)
DEV_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
CLOCK_SKEW = dt.timedelta(minutes=15)
_SIGNED_HEADERS = (
    "Content-Encoding",
    "Content-Language",
    "Content-Length",
    "Content-MD5",
    "Content-Type",
    "Date",
    "If-Modified-Since",
    "If-Match",
    "If-None-Match",
    "If-Unmodified-Since",
    "Range",
)
_DFS_OPS = {"create", "append", "flush", "rename", "delete", "list", "mkdir"}
# operation -> (SAS resource type, any one of these permissions)
_SAS_NEEDS = {
    "fs_create": ("c", "cw"),
    "fs_delete": ("c", "d"),
    "fs_props": ("c", "r"),
    "list": ("c", "l"),
    "create": ("o", "cw"),
    "mkdir": ("o", "cw"),
    "append": ("o", "aw"),
    "flush": ("o", "w"),
    "rename": ("o", "w"),
    "delete": ("o", "d"),
    "read": ("o", "r"),
    "props": ("o", "r"),
}


def query_params(raw_query: str) -> dict[str, list[str]]:
    """Query parameters as the service reads them: names and values percent-decoded
    (a `+` stays a plus, as in a SAS signature)."""
    params: dict[str, list[str]] = {}
    for pair in raw_query.split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        params.setdefault(unquote(name), []).append(unquote(value))
    return params


def shared_key_string_to_sign(
    method: str, raw_path: str, raw_query: str, headers: dict[str, str], account: str
) -> str:
    """The SharedKey string-to-sign for Blob and DFS (version 2009-09-19 and later)."""
    lower = {k.lower(): v for k, v in headers.items()}

    def value(name: str) -> str:
        v = lower.get(name.lower(), "")
        return "" if name == "Content-Length" and v == "0" else v

    lines = [method, *(value(n) for n in _SIGNED_HEADERS)]
    x_ms = sorted((k, " ".join(v.split())) for k, v in lower.items() if k.startswith("x-ms-"))
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in x_ms)
    resource = f"/{account}{raw_path}"
    params = {k.lower(): v for k, v in query_params(raw_query).items()}
    for name in sorted(params):
        resource += f"\n{name}:{','.join(sorted(params[name]))}"
    return "\n".join(lines) + "\n" + canonical_headers + resource


def account_sas_string_to_sign(account: str, q: dict[str, str]) -> str:
    fields = [account, *(q.get(k, "") for k in ("sp", "ss", "srt", "st", "se", "sip", "spr"))]
    fields.append(q.get("sv", ""))
    if q.get("sv", "") >= "2020-12-06":
        fields.append(q.get("ses", ""))
    return "\n".join(fields) + "\n"


def sign(key: str, text: str) -> str:
    digest = hmac.new(base64.b64decode(key), text.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _sas_time(value: str) -> dt.datetime:
    if len(value) == 10:
        value += "T00:00:00Z"
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class _File:
    data: bytes = b""
    pending: bytearray = field(default_factory=bytearray)
    content_type: str = "application/octet-stream"
    content_md5: str | None = None
    etag: str = ""
    modified: float = 0.0

    def touch(self) -> None:
        self.modified = time.time()
        self.etag = f'"0x{hashlib.md5(f"{self.modified}{len(self.data)}{id(self)}".encode()).hexdigest()[:16].upper()}"'


@dataclass
class Fault:
    """From the `nth` (1-based) request matching `op` (and `path`, a substring of
    `<filesystem>/<path>`, if given), `times` times:

    - mode "fail": answer `status`/`code` without applying the operation;
    - mode "lost": apply the operation, then drop the connection without an answer (the
      client sees the connection closed: a lost response);
    - mode "hang": neither apply nor answer for `delay` seconds (or until `release` is set,
      so a test can end the hang when its other steps are done), then drop the connection
      (a service that stops responding; the client's read timeout must end the wait).
    """

    op: str  # "append", "flush", "rename", "create", "delete", "mkdir", "props", ...
    nth: int = 1
    status: int = 500
    code: str = "InternalError"
    times: int = 10**9
    mode: str = "fail"
    path: str | None = None
    delay: float = 30.0
    seen: int = 0
    hits: int = 0  # how many requests this fault took
    release: threading.Event | None = None  # mode "hang": ends the hang early


class AdlsTestServer:
    def __init__(self, account: str = "devstoreaccount1", key: str = DEV_ACCOUNT_KEY) -> None:
        self.account = account
        self.key = key
        self.auth_failures: list[str] = []  # why each rejected request was rejected
        self.filesystems: dict[str, dict[str, _File]] = {}
        self.directories: dict[str, set[str]] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str, int]] = []  # method, op, path, body size
        self.max_body = 0
        self.max_response = 0  # the largest response body: what one read holds in memory
        self.faults: list[Fault] = []
        self.forbidden = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/{self.account}"

    def start(self) -> "AdlsTestServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def ops(self, op: str) -> list[tuple[str, str, str, int]]:
        return [r for r in self.requests if r[1] == op]

    def files(self, filesystem: str) -> dict[str, bytes]:
        return {p: f.data for p, f in self.filesystems.get(filesystem, {}).items()}

    def set_modified(self, filesystem: str, path: str, when: float) -> None:
        """Make the service report `path` as last modified at `when` (epoch seconds): an
        old file, as a killed run leaves one, without waiting for it to age."""
        with self.lock:
            self.filesystems[filesystem][path].modified = when

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._dispatch(self)

            do_PUT = do_PATCH = do_DELETE = do_HEAD = do_POST = do_GET

        return Handler

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        params = query_params(parts.query)
        q = {k: v[0] for k, v in params.items()}
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        segs = unquote(parts.path).lstrip("/").split("/", 2)
        account = segs[0]
        fs = segs[1] if len(segs) > 1 else ""
        path = segs[2] if len(segs) > 2 else ""
        op = self._op(h.command, q, h.headers, path)
        hang = self._dispatch_locked(h, parts, q, op, fs, path, account, body)
        if isinstance(hang, Fault):  # outside the lock: other requests go on
            if hang.release is not None:
                hang.release.wait(hang.delay)
            else:
                time.sleep(hang.delay)
            h.close_connection = True

    def _dispatch_locked(self, h, parts, q, op, fs, path, account, body) -> "Fault | None":
        # a listing names its folder in the query: record (and match faults on) that folder
        target = f"{fs}/{q.get('directory', '')}" if op == "list" else f"{fs}/{path}"
        with self.lock:
            self.requests.append((h.command, op, target, len(body)))
            self.max_body = max(self.max_body, len(body))
            dfs = op in _DFS_OPS
            if account != self.account:
                return self._error(h, 404, "ResourceNotFound", dfs)
            denied = self._authorize(h, parts, q, op)
            if denied is not None:
                status, code, why = denied
                self.auth_failures.append(why)
                return self._error(h, status, code, dfs)
            if self.forbidden:
                return self._error(h, 403, "AuthorizationPermissionMismatch", dfs)
            handler = getattr(self, f"_op_{op}", None)
            for f in self.faults:
                if f.op == op and (f.path is None or f.path in target):
                    f.seen += 1
                    if f.seen >= f.nth and f.times > 0:
                        f.times -= 1
                        f.hits += 1
                        if f.mode == "fail":
                            return self._error(h, f.status, f.code, dfs)
                        if f.mode == "hang":
                            return f
                        return self._lose_response(h, handler, q, fs, path, body)
            if handler is None:
                return self._error(h, 400, "UnsupportedOperation", dfs)
            handler(h, q, fs, path, body)
        return None

    def _lose_response(self, h, handler, q, fs, path, body) -> None:
        """Apply the operation, then close the connection without sending its answer."""
        wfile = h.wfile
        h.wfile = io.BytesIO()
        try:
            if handler is not None:
                handler(h, q, fs, path, body)
        finally:
            h.wfile = wfile
            h.close_connection = True

    # -- authorization ----------------------------------------------------------------------

    def _authorize(self, h, parts, q: dict[str, str], op: str) -> tuple[int, str, str] | None:
        """None if the request is authorized, else (status, code, reason)."""
        auth = h.headers.get("Authorization")
        if auth:
            scheme, _, credential = auth.partition(" ")
            account, _, signature = credential.partition(":")
            if scheme != "SharedKey" or account != self.account:
                return 403, "AuthenticationFailed", f"unsupported authorization {scheme}"
            stamp = h.headers.get("x-ms-date") or h.headers.get("Date")
            try:
                when = email.utils.parsedate_to_datetime(stamp or "")
            except (TypeError, ValueError):
                return 403, "AuthenticationFailed", "no valid x-ms-date or Date header"
            if abs(dt.datetime.now(dt.UTC) - when) > CLOCK_SKEW:
                return 403, "AuthenticationFailed", "request date outside the allowed skew"
            headers = {k: v for k, v in h.headers.items()}
            sts = shared_key_string_to_sign(h.command, parts.path, parts.query, headers, account)
            if not hmac.compare_digest(sign(self.key, sts), signature):
                return 403, "AuthenticationFailed", f"SharedKey signature mismatch for {sts!r}"
            return None
        if "sig" in q:
            return self._authorize_sas(q, op)
        return 401, "NoAuthenticationInformation", "no Authorization header and no SAS"

    def _authorize_sas(self, q: dict[str, str], op: str) -> tuple[int, str, str] | None:
        if "sr" in q or "skoid" in q:
            return 403, "AuthenticationFailed", "only account SAS is supported"
        expected = sign(self.key, account_sas_string_to_sign(self.account, q))
        if not hmac.compare_digest(expected, q["sig"]):
            return 403, "AuthenticationFailed", "SAS signature mismatch"
        now = dt.datetime.now(dt.UTC)
        try:
            if now > _sas_time(q.get("se", "")) or ("st" in q and now < _sas_time(q["st"])):
                return 403, "AuthenticationFailed", "SAS outside its validity period"
        except ValueError:
            return 403, "AuthenticationFailed", "SAS with an invalid st/se"
        if q.get("spr") == "https":
            return 403, "AuthorizationProtocolMismatch", "SAS allows https only"
        if "b" not in q.get("ss", ""):
            return 403, "AuthorizationServiceMismatch", "SAS does not cover the Blob service"
        resource, permissions = _SAS_NEEDS.get(op, ("o", "r"))
        if resource not in q.get("srt", ""):
            return 403, "AuthorizationResourceTypeMismatch", f"SAS srt lacks {resource}"
        if not set(permissions) & set(q.get("sp", "")):
            return 403, "AuthorizationPermissionMismatch", f"SAS sp lacks {permissions}"
        return None

    @staticmethod
    def _op(method: str, q: dict[str, str], headers, path: str) -> str:
        if q.get("restype") == "container":
            return {"PUT": "fs_create", "DELETE": "fs_delete"}.get(method, "fs_props")
        if q.get("resource") == "filesystem" and method == "GET":
            return "list"
        if method == "PUT" and headers.get("x-ms-rename-source"):
            return "rename"
        if method == "PUT" and q.get("resource") == "file":
            return "create"
        if method == "PUT" and q.get("resource") == "directory":
            return "mkdir"
        if method == "PATCH":
            return {"append": "append", "flush": "flush"}.get(q.get("action", ""), "patch")
        return {"DELETE": "delete", "GET": "read", "HEAD": "props"}.get(method, "unknown")

    # -- responses --------------------------------------------------------------------------

    def _send(
        self, h, status: int, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> None:
        h.send_response(status)
        h.send_header("x-ms-request-id", "00000000-0000-0000-0000-000000000000")
        h.send_header("x-ms-version", "2025-01-05")
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            self.max_response = max(self.max_response, len(body))
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, dfs: bool) -> None:
        message = f"{code} (adls test server)"
        if dfs:
            body = json.dumps({"error": {"code": code, "message": message}}).encode()
            ctype = "application/json"
        else:
            body = (
                f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>"
            ).encode()
            ctype = "application/xml"
        self._send(h, status, {"x-ms-error-code": code, "Content-Type": ctype}, body)

    def _file_headers(self, f: _File) -> dict[str, str]:
        headers = {
            "ETag": f.etag,
            "Last-Modified": email.utils.formatdate(f.modified, usegmt=True),
            "Content-Type": f.content_type,
            "x-ms-blob-type": "BlockBlob",
            "x-ms-resource-type": "file",
            "Accept-Ranges": "bytes",
        }
        if f.content_md5:
            headers["Content-MD5"] = f.content_md5
        return headers

    def _send_etag(self, h, status: int, f: _File) -> None:
        modified = email.utils.formatdate(f.modified, usegmt=True)
        self._send(h, status, {"ETag": f.etag, "Last-Modified": modified})

    def _fs(self, h, fs: str, dfs: bool = True) -> dict[str, _File] | None:
        files = self.filesystems.get(fs)
        if files is None:
            self._error(h, 404, "FilesystemNotFound" if dfs else "ContainerNotFound", dfs)
        return files

    def _mkdirs(self, fs: str, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.directories.setdefault(fs, set()).add("/".join(parts[:i]))

    # -- operations -------------------------------------------------------------------------

    def _op_fs_create(self, h, q, fs, path, body) -> None:
        if fs in self.filesystems:
            return self._error(h, 409, "ContainerAlreadyExists", False)
        self.filesystems[fs] = {}
        self.directories[fs] = set()
        self._send(h, 201, {"ETag": '"0x1"', "Last-Modified": email.utils.formatdate(usegmt=True)})

    def _op_fs_props(self, h, q, fs, path, body) -> None:
        if self._fs(h, fs, dfs=False) is not None:
            self._send(
                h, 200, {"ETag": '"0x1"', "Last-Modified": email.utils.formatdate(usegmt=True)}
            )

    def _op_mkdir(self, h, q, fs, path, body) -> None:
        if self._fs(h, fs) is None:
            return
        if h.headers.get("If-None-Match") == "*" and path in self.directories[fs]:
            return self._error(h, 409, "PathAlreadyExists", True)
        self._mkdirs(fs, path + "/x")
        self._send(h, 201, {"ETag": '"0x2"', "Last-Modified": email.utils.formatdate(usegmt=True)})

    def _op_create(self, h, q, fs, path, body) -> None:
        files = self._fs(h, fs)
        if files is None:
            return
        if h.headers.get("If-None-Match") == "*" and path in files:
            return self._error(h, 409, "PathAlreadyExists", True)
        f = _File(content_type=h.headers.get("x-ms-content-type") or "application/octet-stream")
        f.touch()
        files[path] = f
        self._mkdirs(fs, path)
        self._send_etag(h, 201, f)

    def _at_position(self, h, q, fs: str, path: str) -> _File | None:
        """The file an append/flush targets, if it exists and `position` is its end."""
        files = self._fs(h, fs)
        if files is None:
            return None
        f = files.get(path)
        if f is None:
            self._error(h, 404, "PathNotFound", True)
        elif int(q.get("position", -1)) != len(f.data) + len(f.pending):
            self._error(h, 400, "InvalidFlushPosition", True)
        else:
            return f
        return None

    def _op_append(self, h, q, fs, path, body) -> None:
        if (f := self._at_position(h, q, fs, path)) is not None:
            f.pending += body
            self._send(h, 202)

    def _op_flush(self, h, q, fs, path, body) -> None:
        if (f := self._at_position(h, q, fs, path)) is None:
            return
        f.data += bytes(f.pending)
        f.pending.clear()
        f.content_type = h.headers.get("x-ms-content-type") or f.content_type
        f.content_md5 = h.headers.get("x-ms-content-md5") or f.content_md5
        f.touch()
        self._send_etag(h, 200, f)

    def _op_rename(self, h, q, fs, path, body) -> None:
        files = self._fs(h, fs)
        if files is None:
            return
        source = unquote(urlsplit(h.headers["x-ms-rename-source"]).path).lstrip("/")
        src_fs, _, src_path = source.partition("/")
        src_files = self.filesystems.get(src_fs, {})
        if src_path not in src_files:
            return self._error(h, 404, "SourcePathNotFound", True)
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent and parent not in self.directories[fs]:
            # unlike create, a rename does not create the destination's parents
            return self._error(h, 404, "RenameDestinationParentPathNotFound", True)
        # the destination's conditions (a commit point's compare-and-swap)
        dest = files.get(path)
        if_match, if_none_match = h.headers.get("If-Match"), h.headers.get("If-None-Match")
        if if_match is not None and (dest is None or if_match not in ("*", dest.etag)):
            return self._error(h, 412, "ConditionNotMet", True)
        if if_none_match == "*" and dest is not None:
            return self._error(h, 409, "PathAlreadyExists", True)
        if if_none_match not in (None, "*") and dest is not None and dest.etag == if_none_match:
            return self._error(h, 412, "ConditionNotMet", True)
        files[path] = src_files.pop(src_path)
        self._send(h, 201)

    def _op_delete(self, h, q, fs, path, body) -> None:
        files = self._fs(h, fs)
        if files is None:
            return
        if path in files:
            del files[path]
            return self._send(h, 200)
        if path in self.directories[fs]:
            inside = [p for p in files if p.startswith(path + "/")]
            subdirs = [d for d in self.directories[fs] if d.startswith(path + "/")]
            if (inside or subdirs) and q.get("recursive") != "true":
                return self._error(h, 409, "DirectoryNotEmpty", True)
            for p in inside:
                del files[p]
            self.directories[fs] = {
                d for d in self.directories[fs] if d != path and not d.startswith(path + "/")
            }
            return self._send(h, 200)
        self._error(h, 404, "PathNotFound", True)

    def _blob(self, h, fs: str, path: str) -> _File | None:
        """A committed file through the Blob API, or its 404."""
        files = self._fs(h, fs, dfs=False)
        f = files.get(path) if files is not None else None
        if files is not None and f is None:
            self._error(h, 404, "BlobNotFound", False)
        return f

    def _op_props(self, h, q, fs, path, body) -> None:
        if fs in self.filesystems and path in self.directories[fs]:
            # a directory seen through the Blob API: an empty blob marked as a folder
            stamp = email.utils.formatdate(usegmt=True)
            headers = {"ETag": '"0x2"', "Last-Modified": stamp, "x-ms-blob-type": "BlockBlob",
                       "x-ms-meta-hdi_isfolder": "true", "Content-Length": "0"}  # fmt: skip
            return self._send(h, 200, headers)
        if (f := self._blob(h, fs, path)) is not None:
            self._send(h, 200, {**self._file_headers(f), "Content-Length": str(len(f.data))})

    def _op_read(self, h, q, fs, path, body) -> None:
        if (f := self._blob(h, fs, path)) is None:
            return
        rng = h.headers.get("x-ms-range") or h.headers.get("Range")
        data, status, headers = f.data, 200, self._file_headers(f)
        if rng and (m := re.match(r"bytes=(\d+)-(\d*)", rng)):
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else len(f.data) - 1, len(f.data) - 1)
            if f.data and start >= len(f.data):
                return self._error(h, 416, "InvalidRange", False)
            data = f.data[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(f.data)}"
        self._send(h, status, headers, data)

    def _op_list(self, h, q, fs, path, body) -> None:
        files = self._fs(h, fs)
        if files is None:
            return
        prefix = q.get("directory", "").strip("/")
        recursive = q.get("recursive") == "true"

        def under(p: str) -> bool:
            if prefix and not p.startswith(prefix + "/"):
                return False
            rest = p[len(prefix) + 1 :] if prefix else p
            return recursive or "/" not in rest

        paths = [
            {
                "name": d,
                "isDirectory": "true",
                "lastModified": email.utils.formatdate(usegmt=True),
                "etag": '"0x2"',
                "contentLength": "0",
            }
            for d in sorted(self.directories[fs])
            if under(d)
        ]
        paths += [{"name": p, "contentLength": str(len(f.data)), "lastModified": email.utils.formatdate(f.modified, usegmt=True), "etag": f.etag}
                  for p, f in sorted(files.items()) if under(p)]  # fmt: skip
        if prefix and prefix not in self.directories[fs] and not paths:
            return self._error(h, 404, "PathNotFound", True)
        body = json.dumps({"paths": paths}).encode()
        self._send(h, 200, {"Content-Type": "application/json"}, body)
