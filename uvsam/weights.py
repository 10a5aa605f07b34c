"""The weights manager: list, fetch (resumable, SHA-256 verified), import and verify.

Weights live in a cache directory (``$UVSAM_CACHE/weights``, default ``~/.cache/uvsam/weights``).
A file is used only after its SHA-256 matches the registry's digest, or, for families whose
authors publish none, a digest the user pinned on import or fetch (kept in ``pins.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from uvsam.checkpoint import load_generalist
from uvsam.errors import WeightsError
from uvsam.files import atomic_path, cache_home, sha256_file
from uvsam.modeling.registry import ENCODERS, EncoderSpec, get_spec


def cache_dir() -> Path:
    return cache_home() / "weights"


@dataclass
class WeightsStatus:
    name: str
    filename: str
    url: str
    sha256: str | None
    size: int | None
    licence: str
    status: str  # "missing", "present", "verified", "MISMATCH", "unreleased"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _pins_path() -> Path:
    return cache_dir() / "pins.json"


def _pins() -> dict[str, str]:
    p = _pins_path()
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read pinned digests ({e})", p) from None


def _pin(name: str, digest: str) -> None:
    pins = _pins()
    pins[name] = digest
    cache_dir().mkdir(parents=True, exist_ok=True)
    with atomic_path(_pins_path()) as tmp:
        tmp.write_text(json.dumps(pins, indent=2, sort_keys=True))


def expected_sha256(spec: EncoderSpec) -> str | None:
    if spec.weights is None:
        return None
    return spec.weights.sha256 or _pins().get(spec.name)


def local_path(spec: EncoderSpec) -> Path:
    if spec.weights is None:
        raise WeightsError(f"{spec.name}: no published weights ({spec.weights_note})")
    return cache_dir() / spec.weights.filename


def status(spec: EncoderSpec, check: bool = False) -> WeightsStatus:
    w = spec.weights
    if w is None:
        return WeightsStatus(spec.name, "-", "-", None, None, spec.licence, "unreleased")
    path = local_path(spec)
    digest = expected_sha256(spec)
    state = "missing"
    if path.exists():
        state = "present"
        if check and digest:
            state = "verified" if sha256_file(path) == digest else "MISMATCH"
    return WeightsStatus(spec.name, w.filename, w.url, digest, w.size, spec.licence, state)


def list_weights(check: bool = False) -> list[WeightsStatus]:
    return [status(s, check) for s in ENCODERS.values()]


def _valid_digest(digest: str) -> str:
    d = digest.strip().lower()
    if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
        raise WeightsError(f"{digest!r} is not a SHA-256 digest (64 hex characters)")
    return d


def resolve(name: str) -> Path:
    """Path of the verified cached weights of encoder ``name``."""
    spec = get_spec(name)
    path = local_path(spec)
    if not path.exists():
        raise WeightsError(
            f"weights of {name} are not in the cache; run `uvsam weights fetch {name}` or "
            f"`uvsam weights import {name} FILE`", path,
        )
    digest = expected_sha256(spec)
    if digest is None or sha256_file(path) != digest:
        raise WeightsError("cached weights do not match their SHA-256; fetch or import them again", path)
    return path


def fetch(name: str, url: str | None = None, sha256: str | None = None, timeout: float = 30.0,
          chunk: int = 1 << 20, progress=None) -> Path:
    """Download the weights of ``name`` into the cache, resuming a partial download.

    The file is moved into place only after its SHA-256 matches; a mismatch deletes the
    partial file. ``url`` overrides the official address (a mirror); ``sha256`` pins a digest
    for families whose authors publish none (and must agree with the registry otherwise).
    """
    spec = get_spec(name)
    dest = local_path(spec)
    digest = expected_sha256(spec)
    if sha256 is not None:
        given = _valid_digest(sha256)
        if digest is not None and given != digest:
            raise WeightsError(f"--sha256 {given} disagrees with the pinned digest {digest} of {name}")
        digest = given
    if digest is None:
        pinned = ", ".join(n for n in ENCODERS if expected_sha256(get_spec(n)) is not None)
        raise WeightsError(
            f"{name}: its authors publish no SHA-256, so a genuine file cannot be told from a corrupted or "
            f"altered one; get the digest from a source you trust (or hash a copy you trust) and pin it: "
            f"`uvsam weights fetch {name} --sha256 DIGEST` (or `uvsam weights import {name} FILE --sha256 DIGEST`)"
            f"; weights whose digest uvsam knows: {pinned}"
        )
    src = url or spec.weights.url
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(src, headers={"User-Agent": "uvsam"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if have and resp.status != 206:  # server ignored the range: start again
                have = 0
            total = resp.headers.get("Content-Length")
            total = int(total) + have if total is not None else None
            with open(part, "ab" if have else "wb") as f:
                done = have
                while block := resp.read(chunk):
                    f.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            if total is not None and done < total:
                raise OSError(f"connection closed after {done} of {total} bytes")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsError(
            f"cannot download {src} ({reason}); run again to resume, or download the file elsewhere and run "
            f"`uvsam weights import {name} FILE`"
        ) from None
    if spec.weights.archive_member:
        part = _extract_member(part, spec.weights.archive_member, src)
    got = sha256_file(part)
    if got != digest:
        part.unlink()
        raise WeightsError(f"downloaded file has SHA-256 {got}, expected {digest}; deleted it", src)
    os.replace(part, dest)
    if spec.weights.sha256 is None:
        _pin(name, digest)
    return dest


def _extract_member(archive: Path, member: str, src: str) -> Path:
    """Extract ``member`` of the downloaded zip ``archive`` next to it; the archive is removed."""
    out = archive.with_name(Path(member).name + ".unzipped")
    try:
        with zipfile.ZipFile(archive) as z, z.open(_find_member(z, member)) as fin, open(out, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        out.unlink(missing_ok=True)
        archive.unlink()
        raise WeightsError(f"downloaded archive is unreadable or lacks {member} ({e}); deleted it", src) from None
    archive.unlink()
    return out


def _find_member(z: zipfile.ZipFile, member: str) -> str:
    names = [n for n in z.namelist() if n == member or n.endswith("/" + member)]
    if not names:
        raise KeyError(member)
    return names[0]


def import_file(name: str, file: str | Path, sha256: str | None = None) -> Path:
    """Check a local checkpoint file (digest and structure) and copy it into the cache."""
    spec = get_spec(name)
    src = Path(file)
    if not src.is_file():
        raise WeightsError("file does not exist", src)
    digest = expected_sha256(spec)
    got = sha256_file(src)
    if sha256 is not None and _valid_digest(sha256) != got:
        raise WeightsError(f"file has SHA-256 {got}, not the given {sha256}", src)
    if digest is not None and got != digest:
        raise WeightsError(f"file has SHA-256 {got}, but {name}'s is {digest}: not the published file", src)
    load_generalist(spec, src)  # structure: loads strictly, else a CheckpointError naming the file
    dest = local_path(spec)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    if digest is None:
        _pin(name, got)
    return dest
