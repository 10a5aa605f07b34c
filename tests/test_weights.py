"""The weights manager against a local HTTP server on 127.0.0.1 (Range requests honoured)."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading

import pytest

from uvsam import weights
from uvsam.errors import UvsamError

from .conftest import run_cli


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    fail_after: int | None = None  # drop the connection after this many bytes (first request)
    requests: list[str | None] = []

    def do_GET(self):  # noqa: N802
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).fail_after is not None:
            self.wfile.write(body[: type(self).fail_after])
            type(self).fail_after = None
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(mobile_sam_ckpt):
    _RangeHandler.payload = mobile_sam_ckpt.read_bytes()
    _RangeHandler.requests = []
    _RangeHandler.fail_after = None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/mobile_sam.pt"
    srv.shutdown()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UVSAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights"


def test_fetch_resumes_and_verifies(server, mobile_sam_ckpt, cache, capsys):
    digest = hashlib.sha256(mobile_sam_ckpt.read_bytes()).hexdigest()
    _RangeHandler.fail_after = 1_000_000  # the first download breaks off after 1 MB
    code, _, err = run_cli(["weights", "fetch", "mobile_sam", "--url", server, "--sha256", digest], capsys)
    assert code == 2 and "cannot download" in err and "uvsam weights import mobile_sam" in err
    part = cache / "mobile_sam.pt.part"
    assert part.stat().st_size == 1_000_000 and not (cache / "mobile_sam.pt").exists()

    code, out, err = run_cli(["weights", "fetch", "mobile_sam", "--url", server, "--sha256", digest], capsys)
    assert code == 0, err
    assert _RangeHandler.requests[-1] == "bytes=1000000-"  # resumed, not restarted
    assert (cache / "mobile_sam.pt").read_bytes() == mobile_sam_ckpt.read_bytes()
    assert not part.exists()
    # the digest is pinned: later uses verify against it
    assert weights.resolve("mobile_sam") == cache / "mobile_sam.pt"
    code, out, _ = run_cli(["weights", "verify"], capsys)
    assert code == 0 and "mobile_sam: verified" in out


def test_fetch_rejects_wrong_digest(server, cache, capsys):
    code, _, err = run_cli(["weights", "fetch", "mobile_sam", "--url", server, "--sha256", "0" * 64], capsys)
    assert code == 2 and "expected 0000" in err and "deleted" in err
    assert not any(cache.glob("mobile_sam.pt*"))


def test_fetch_offline_is_one_line(capsys):
    code, _, err = run_cli(["weights", "fetch", "sam_vit_b", "--url", "http://127.0.0.1:9/sam_vit_b.pth"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "uvsam weights import sam_vit_b FILE" in err


def test_unpinned_fetch_needs_a_digest(capsys):
    code, _, err = run_cli(["weights", "fetch", "mobile_sam"], capsys)
    assert code == 2 and "--sha256" in err


def test_import_checks_structure_and_digest(mobile_sam_ckpt, tmp_path, cache, capsys):
    # the official SAM digest is known: any other file is refused before it is copied
    code, _, err = run_cli(["weights", "import", "sam_vit_b", mobile_sam_ckpt], capsys)
    assert code == 2 and "not the published file" in err and not (cache / "sam_vit_b_01ec64.pth").exists()
    # wrong family for an unpinned variant: refused on structure
    code, _, err = run_cli(["weights", "import", "efficientvit_sam_l0", mobile_sam_ckpt], capsys)
    assert code == 2 and "does not fit encoder" in err
    code, out, err = run_cli(["weights", "import", "mobile_sam", mobile_sam_ckpt], capsys)
    assert code == 0, err
    assert weights.resolve("mobile_sam").read_bytes() == mobile_sam_ckpt.read_bytes()
    # a tampered cache file is caught
    (cache / "mobile_sam.pt").write_bytes(b"tampered")
    with pytest.raises(UvsamError, match="do not match"):
        weights.resolve("mobile_sam")
    code, out, err = run_cli(["weights", "verify"], capsys)
    assert code == 2 and "mobile_sam: MISMATCH" in out


def test_list_shows_every_variant(capsys):
    import json

    code, out, _ = run_cli(["weights", "list", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == set(weights.ENCODERS)
    assert rows["sam_vit_h"]["sha256"].startswith("a7bf3b02")
    assert rows["sam_vit_h"]["url"].startswith("https://dl.fbaipublicfiles.com/")


def test_fetch_extracts_a_zipped_checkpoint(server, cache, tmp_path, capsys):
    """EfficientSAM-S is published zipped: the member is extracted and its own digest verified."""
    import io
    import zipfile

    import torch

    from uvsam.checkpoint import save_official
    from uvsam.modeling import build_generalist

    ckpt = tmp_path / "efficient_sam_vits.pt"
    save_official(build_generalist("efficientsam_s"), ckpt)
    state = torch.load(ckpt, weights_only=True)
    torch.save({"model": state}, ckpt)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(ckpt, "weights/efficient_sam_vits.pt")
    _RangeHandler.payload = buf.getvalue()
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    url = server.replace("mobile_sam.pt", "efficient_sam_vits.pt.zip")
    code, _, err = run_cli(["weights", "fetch", "efficientsam_s", "--url", url, "--sha256", digest], capsys)
    assert code == 0, err
    assert weights.resolve("efficientsam_s").read_bytes() == ckpt.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["efficient_sam_vits.pt", "pins.json"]

    _RangeHandler.payload = b"not a zip archive"
    (cache / "efficient_sam_vits.pt").unlink()
    code, _, err = run_cli(["weights", "fetch", "efficientsam_s", "--url", url, "--sha256", digest], capsys)
    assert code == 2 and "unreadable" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["pins.json"]
