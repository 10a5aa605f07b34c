"""Servers the tests start on 127.0.0.1 and stop again (no internet here, nor needed)."""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import psutil


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Static files with what cloud object stores answer: HEAD, byte ranges (206), ETag and
    Last-Modified; ``server.faults`` transient failures first (503 answers, dropped connections)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _file(self) -> Path | None:
        path = (self.server.root / self.path.split("?")[0].lstrip("/")).resolve()
        return path if path.is_file() and self.server.root in path.parents else None

    def _headers(self, path: Path, length: int, status: int = 200, extra: dict | None = None) -> None:
        st = path.stat()
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"' + hashlib.sha1(f"{st.st_mtime_ns}-{st.st_size}".encode()).hexdigest() + '"')
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def do_HEAD(self):  # noqa: N802
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        self._headers(path, path.stat().st_size)

    def do_GET(self):  # noqa: N802
        with self.server.lock:
            fault = self.server.faults.pop(0) if self.server.faults else None
            self.server.gets += 1
        if not hasattr(self, "peer_pid"):  # once per connection: which process on this machine opened it
            self.peer_pid = next((c.pid for c in psutil.net_connections("tcp")
                                  if c.laddr and c.laddr.port == self.client_address[1] and c.pid), None)
            with self.server.lock:
                self.server.clients.add(self.peer_pid)
        if fault == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        if fault == "drop":
            self.connection.close()
            return
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        size = path.stat().st_size
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        with open(path, "rb") as f:
            if match:
                start = int(match.group(1))
                end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
                f.seek(start)
                body = f.read(end - start + 1)
                self._headers(path, len(body), 206, {"Content-Range": f"bytes {start}-{end}/{size}"})
                with self.server.lock:
                    self.server.ranges += 1
            else:
                body = f.read()
                self._headers(path, len(body))
        self.wfile.write(body)


@contextmanager
def http_server(root: str | os.PathLike):
    """Serve ``root`` on 127.0.0.1 (a free port); yields the server (``url``, ``faults``, counts)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.root, server.faults, server.lock = Path(root).resolve(), [], threading.Lock()
    server.gets = server.ranges = 0
    server.clients = set()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
