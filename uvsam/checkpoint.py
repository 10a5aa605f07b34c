"""Loading published generalist checkpoints safely and strictly.

Files are read with ``torch.load(weights_only=True)`` only: a checkpoint can never run code.
The published layouts are accepted as they are: a flat state dict, or one wrapped under
``model`` or ``state_dict``. Keys are matched strictly against the variant's official layout
and every mismatch is reported in one line.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from tiles.errors import first_line
from uvsam.errors import CheckpointError
from uvsam.files import atomic_path, sha256_file
from uvsam.modeling.registry import EncoderSpec
from uvsam.modeling.sam import Generalist, build_generalist

WRAPPER_KEYS = ("model", "state_dict")


def load_tensors(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``, memory-mapped where the file is a zip archive
    (torch's format since 1.6): the tensors are read from the page cache as they are copied into
    a model, not first into a private copy of the whole file.

    A crafted file is refused (:class:`CheckpointError`) before or right after it is parsed: an
    archive whose member names leave it (``../``, absolute) or that declares far more data than
    it holds (a zip bomb), and tensors that claim more elements than their storage holds (a
    view that copying would blow up to terabytes)."""
    path = Path(path)
    archive = zipfile.is_zipfile(path)
    if archive:
        check_archive(path)
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=archive)
    check_tensors(obj, path)
    return obj


MAX_INFLATION = 4  # a torch archive stores its tensors uncompressed: declared sizes match the file's


def check_archive(path: Path) -> None:
    """Refuse a zip archive whose members would be written or read outside it, or that declares
    much more data than the file holds."""
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"is truncated or corrupt ({first_line(e)})", path) from None
    for m in members:
        name = m.filename.replace("\\", "/")
        if name.startswith("/") or ".." in name.split("/") or ":" in name.split("/")[0]:
            raise CheckpointError(f"holds an archive member named {m.filename!r}, outside the archive: refused "
                                  "(a crafted file?)", path)
    declared = sum(m.file_size for m in members)
    size = path.stat().st_size
    if declared > MAX_INFLATION * size + (1 << 20):
        raise CheckpointError(f"declares {declared / 1e9:,.1f} GB of data in a {size / 1e6:,.1f} MB file: refused "
                              "(a zip bomb?)", path)


def check_tensors(obj: object, path: Path, depth: int = 0) -> None:
    """Every tensor of a loaded file must fit its own storage (no view larger than its data)."""
    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        need = obj.numel() * obj.element_size()
        have = obj.untyped_storage().nbytes()
        if need > have:
            shape = " x ".join(map(str, obj.shape))
            raise CheckpointError(f"declares a {shape} tensor ({need / 1e9:,.1f} GB) over {have:,} bytes of data: "
                                  "refused (a crafted file?)", path)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            check_tensors(v, path, depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            check_tensors(v, path, depth + 1)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict, or raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("checkpoint file does not exist", path)
    if path.is_dir():
        raise CheckpointError("checkpoint path is a directory, not a file", path)
    if path.stat().st_size == 0:
        raise CheckpointError("checkpoint file is empty (0 bytes)", path)
    try:
        obj = load_tensors(path)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):  # a class or function reference: code
            raise CheckpointError(
                "checkpoint is a pickled Python object (a whole model, such as TinySAM's w8a8 file), not a "
                "state dict; uvsam never unpickles code - export its state_dict() instead",
                path,
            ) from None
        raise CheckpointError("checkpoint is not a PyTorch file (neither a zip archive nor a pickle)", path) from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"checkpoint is truncated or corrupt ({first_line(e)})", path) from None
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint is truncated or corrupt ({first_line(e)})", path) from None
    except OSError as e:
        raise CheckpointError(f"checkpoint cannot be read ({first_line(e)})", path) from None
    except Exception as e:  # any other parse failure of arbitrary bytes: not a checkpoint
        raise CheckpointError(f"checkpoint is not a valid PyTorch file ({type(e).__name__})", path) from None
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint holds {type(obj).__name__}, not a state dict of tensors", path)
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        raise CheckpointError(
            f"checkpoint holds {len(obj) - len(tensors)} entries that are not tensors: not a state dict", path
        )
    return tensors


def load_generalist(spec: EncoderSpec | str, path: str | Path, strict: bool = True) -> Generalist:
    """Build the variant and load a published checkpoint into it (strict by default)."""
    model = build_generalist(spec)
    state = read_state_dict(path)
    try:
        model.load_official_state_dict(state, strict=strict)
    except (KeyError, ValueError) as e:
        msg = e.args[0] if e.args else str(e)
        raise CheckpointError(
            f"checkpoint does not fit encoder {model.spec.name!r} (wrong family or variant?): {msg}", path
        ) from None
    model.weights_sha256 = sha256_file(path)
    return model.eval()


def save_official(model: Generalist, path: str | Path) -> None:
    """Save ``model`` as a flat state dict in its family's official key layout (atomically)."""
    with atomic_path(path) as tmp:
        torch.save(model.official_state_dict(), tmp)
