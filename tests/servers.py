"""Servers the tests start on 127.0.0.1 and stop again (no internet here, nor needed)."""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import json
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psutil


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Static files with what cloud object stores answer: HEAD, byte ranges (206), ETag and
    Last-Modified; ``server.faults`` transient failures first (503 answers, ``drop``: connections
    closed unanswered, ``truncate``: half the promised body, then closed)."""

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
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        try:
            self._get()
        finally:
            with self.server.lock:
                self.server.in_flight -= 1

    def _get(self):
        with self.server.lock:
            fault = self.server.faults.pop(0) if self.server.faults else None
            self.server.gets += 1
        if not hasattr(self, "peer_pid"):  # once per connection: which process on this machine opened it
            self.peer_pid = next((c.pid for c in psutil.net_connections("tcp")
                                  if c.laddr and c.laddr.port == self.client_address[1] and c.pid), None)
            with self.server.lock:
                self.server.clients.add(self.peer_pid)
        if fault is not None and fault.isdigit():  # an HTTP error status (503: retried; 403: not)
            self.send_response(int(fault))
            self.send_header("Content-Length", "0")
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        if fault == "drop":  # closed at once (shut down: rfile and wfile hold the socket open otherwise)
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        truncate = fault == "truncate"  # the headers promise the whole body; half comes, then the connection closes
        time.sleep(self.server.delay)
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
        if truncate:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


@contextmanager
def serving(handler, **state):
    """A threaded HTTP server of ``handler`` on 127.0.0.1 (a free port), ``state`` set on it; yields it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for key, value in state.items():
        setattr(server, key, value)
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def http_server(root: str | os.PathLike):
    """Serve ``root`` on 127.0.0.1 (a free port); yields the server (``url``, ``faults``, counts)."""
    return serving(RangeHandler, root=Path(root).resolve(), faults=[], lock=threading.Lock(), gets=0, ranges=0,
                   in_flight=0, max_in_flight=0, clients=set(), delay=0.0)


class StacApiHandler(http.server.BaseHTTPRequestHandler):
    """A minimal STAC API (core + item-search, as pystac-client speaks it): the landing page at /
    and POST/GET /search over ``server.items`` (dicts), filtered by bbox and datetime."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _json(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/geo+json" if body.get("type") == "FeatureCollection"
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        url = urlsplit(self.path)
        if url.path in ("", "/"):
            root = self.server.url + "/"
            self._json({"type": "Catalog", "id": "test-api", "stac_version": "1.0.0", "description": "test",
                        "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                                       "https://api.stacspec.org/v1.0.0/item-search"],
                        "links": [{"rel": "self", "href": root, "type": "application/json"},
                                  {"rel": "root", "href": root, "type": "application/json"},
                                  {"rel": "search", "href": self.server.url + "/search",
                                   "type": "application/geo+json", "method": "GET"},
                                  {"rel": "search", "href": self.server.url + "/search",
                                   "type": "application/geo+json", "method": "POST"}]})
        elif url.path == "/search":
            q = parse_qs(url.query)
            self._search({"bbox": [float(v) for v in q["bbox"][0].split(",")] if "bbox" in q else None,
                          "datetime": q.get("datetime", [None])[0]})
        else:
            self._json({"code": "NotFound", "description": url.path}, 404)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self._search(body)

    def _search(self, query: dict) -> None:
        self.server.searches.append(query)
        found = []
        for item in self.server.items:
            if query.get("bbox"):
                w, s, e, n = query["bbox"]
                iw, is_, ie, in_ = item["bbox"]
                if ie < w or iw > e or in_ < s or is_ > n:
                    continue
            if query.get("datetime"):
                t = datetime.fromisoformat(item["properties"]["datetime"].replace("Z", "+00:00"))
                lo, _, hi = query["datetime"].partition("/")
                hi = hi or lo
                if (lo not in ("", "..") and t < datetime.fromisoformat(lo.replace("Z", "+00:00"))) or (
                        hi not in ("", "..") and t > datetime.fromisoformat(hi.replace("Z", "+00:00"))):
                    continue
            found.append(item)
        self._json({"type": "FeatureCollection", "features": found, "links": []})


def stac_api_server(items: list[dict]):
    """A STAC API on 127.0.0.1 serving ``items``; yields the server (``url``, ``searches``)."""
    return serving(StacApiHandler, items=items, searches=[])


def xyz_pyramid(mosaic: str | os.PathLike, zoom: int, root: str | os.PathLike) -> int:
    """Cut a mosaic on the Web Mercator grid of ``zoom`` (as `uvsam import-xyz` writes them) into
    the standard 256 px tiles of a tile server, ``root/{z}/{x}/{y}.png`` (RGBA: alpha is the
    mosaic's validity; tiles without a valid pixel are left out, a server's 404). Returns how many."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from tiles.xyz import HALF_CIRCUMFERENCE

    n = 0
    with rasterio.open(mosaic) as ds:
        res = 2 * HALF_CIRCUMFERENCE / 2**zoom / 256
        col0 = round((ds.transform.c + HALF_CIRCUMFERENCE) / res)
        row0 = round((HALF_CIRCUMFERENCE - ds.transform.f) / res)
        assert abs(ds.transform.a - res) < 1e-9 * res and col0 % 256 == 0 and row0 % 256 == 0, "not on the tile grid"
        for r in range(0, ds.height, 256):
            for c in range(0, ds.width, 256):
                window = Window(c, r, 256, 256)
                valid = ds.read_masks(1, window=window, boundless=True)
                if not valid.any():
                    continue
                rgb = ds.read([1, 2, 3], window=window, boundless=True, fill_value=0)
                out = Path(root) / str(zoom) / str((col0 + c) // 256) / f"{(row0 + r) // 256}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                with rasterio.open(out, "w", driver="PNG", width=256, height=256, count=4, dtype="uint8") as png:
                    png.write(np.concatenate([rgb, valid[None]]))
                n += 1
    return n
