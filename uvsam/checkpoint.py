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

from uvsam.errors import CheckpointError
from uvsam.files import atomic_path, sha256_file
from uvsam.modeling.registry import EncoderSpec
from uvsam.modeling.sam import Generalist, build_generalist

WRAPPER_KEYS = ("model", "state_dict")


def load_tensors(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``, memory-mapped where the file is a zip archive
    (torch's format since 1.6): the tensors are read from the page cache as they are copied into
    a model, not first into a private copy of the whole file."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


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
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):  # a class or function reference: code
            raise CheckpointError(
                "checkpoint is a pickled Python object (a whole model, such as TinySAM's w8a8 file), not a "
                "state dict; uvsam never unpickles code - export its state_dict() instead",
                path,
            ) from None
        raise CheckpointError("checkpoint is not a PyTorch file (neither a zip archive nor a pickle)", path) from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"checkpoint is truncated or corrupt ({_first_line(e)})", path) from None
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint is truncated or corrupt ({_first_line(e)})", path) from None
    except OSError as e:
        raise CheckpointError(f"checkpoint cannot be read ({_first_line(e)})", path) from None
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
