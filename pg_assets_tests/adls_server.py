"""A protocol-level ADLS Gen2 test server for the requests the Azure SDK sends.

There is no official local emulator for the DFS endpoint (Azurite serves Blob only), so this
speaks just enough of both REST dialects, with the service's semantics where they matter to
us: appended data stays invisible until flushed, appends and flushes must come at the exact
position, a rename needs an existing source and replaces the destination, and errors carry
the service's codes (JSON bodies for DFS, XML for Blob, `x-ms-error-code` on both).

It records every request and the largest request body, and can inject faults (a failing
append, a forbidden account) so tests can drive the real SDK through real failures.
URLs are IP-style, as for Azurite: http://127.0.0.1:<port>/<account>/<filesystem>/<path>.
"""

import email.utils
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


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
    """Answer the `nth` (1-based) request matching `op` with `status`/`code`, `times` times."""

    op: str  # "append", "flush", "rename", "create", ...
    nth: int
    status: int
    code: str
    times: int = 10**9
    seen: int = 0


class AdlsTestServer:
    def __init__(self, account: str = "devstoreaccount1") -> None:
        self.account = account
        self.filesystems: dict[str, dict[str, _File]] = {}
        self.directories: dict[str, set[str]] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str, int]] = []  # method, op, path, body size
        self.max_body = 0
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
        q = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        segs = unquote(parts.path).lstrip("/").split("/", 2)
        account = segs[0]
        fs = segs[1] if len(segs) > 1 else ""
        path = segs[2] if len(segs) > 2 else ""
        op = self._op(h.command, q, h.headers, path)
        with self.lock:
            self.requests.append((h.command, op, f"{fs}/{path}", len(body)))
            self.max_body = max(self.max_body, len(body))
            dfs = op in {"create", "append", "flush", "rename", "delete", "list", "mkdir"}
            if account != self.account:
                return self._error(h, 404, "AccountNotFound" if False else "ResourceNotFound", dfs)
            if self.forbidden or not (h.headers.get("Authorization") or "sig" in q):
                return self._error(h, 403, "AuthorizationPermissionMismatch", dfs)
            for f in self.faults:
                if f.op == op:
                    f.seen += 1
                    if f.seen >= f.nth and f.times > 0:
                        f.times -= 1
                        return self._error(h, f.status, f.code, dfs)
            handler = getattr(self, f"_op_{op}", None)
            if handler is None:
                return self._error(h, 400, "UnsupportedOperation", dfs)
            handler(h, q, fs, path, body)

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
        files[path] = src_files.pop(src_path)
        self._mkdirs(fs, path)
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
            if inside and q.get("recursive") != "true":
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
