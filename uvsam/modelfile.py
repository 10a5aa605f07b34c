"""The trained-model file: everything inference needs to reproduce training's preprocessing.

A ``.ckpt`` holds plain tensors and JSON-like metadata only (read with ``weights_only=True``):
the :class:`UVSAMConfig` (encoder, specialist, fusion, training GSD), the trainable weights
(specialist, fusion head, ladder network, and the mask decoder when it was tuned), the
generalist's identity (encoder name and the SHA-256 of its official weights file), the
scene normalisation and training radiometry, the training configuration and metrics, and, for
``--resume``, the optimiser and scheduler state.

The frozen generalist is not copied into the file when it came from an official checkpoint:
it is found again by its digest (``--checkpoint`` or the weights cache) and refused if the
digest differs. A generalist with random weights (tests, demos) is stored in the file, so the
model stays reproducible.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from uvsam.checkpoint import load_tensors
from uvsam.errors import CheckpointError
from uvsam.files import atomic_path, sha256_file
from uvsam.modeling.sam import build_generalist
from uvsam.modeling.uvsam import UVSAM, UVSAMConfig

FORMAT = "uvsam-model"
VERSION = 1


def trainable_state(model: UVSAM) -> dict[str, torch.Tensor]:
    """The model's own weights: everything but the frozen generalist (its decoder when tuned)."""
    keep = ("generalist.mask_decoder.",) if model.config.tune_decoder else ()
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith("generalist.") or k.startswith(keep)}


def save_model(path: str | Path, model: UVSAM, meta: dict, training: dict | None = None) -> None:
    """Write the model file atomically. ``meta`` must hold ``generalist`` ({encoder, sha256, source})."""
    meta = json.loads(json.dumps(meta))  # plain types only: the file must load with weights_only=True
    gen = meta["generalist"]
    payload = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "meta": meta,
               "state": trainable_state(model)}
    if gen["source"] == "random":
        payload["generalist_state"] = {k: v.detach().clone() for k, v in model.generalist.state_dict().items()}
    if training is not None:
        payload["training"] = training
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_model_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("model file does not exist", path)
    if path.stat().st_size == 0:
        raise CheckpointError("model file is empty (0 bytes)", path)
    try:
        payload = load_tensors(path)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):  # a class or function reference: code
            raise CheckpointError("model file holds pickled Python objects; uvsam loads tensors only", path) from None
        raise CheckpointError("not a uvsam model file (not a PyTorch file at all)", path) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise CheckpointError(f"not a readable uvsam model ({str(e).splitlines()[0][:160]})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError("not a uvsam model file (is it a generalist checkpoint? give it to --checkpoint)",
                              path)
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"model file version {payload['version']} is newer than this uvsam reads "
                              f"({VERSION}); upgrade uvsam", path)
    return payload


def generalist_file(payload: dict, path: str | Path, checkpoint: str | Path | None) -> Path | None:
    """The official weights file a model needs (``checkpoint``, else the cache), checked by
    SHA-256 against the one it was trained with; None when the model carries its generalist.

    Cheap (a hash, no model built): ``uvsam predict`` calls it before any work.
    """
    config, gen = UVSAMConfig.from_dict(payload["config"]), payload["meta"]["generalist"]
    if gen["source"] == "random":
        if checkpoint is not None:
            raise CheckpointError("the model carries its own generalist (trained without official weights); "
                                  "--checkpoint would not be used: leave it out", path)
        return None
    from uvsam.weights import resolve

    file = Path(checkpoint) if checkpoint is not None else resolve(config.encoder)
    digest = sha256_file(file) if file.is_file() else None
    if digest != gen["sha256"]:
        raise CheckpointError(f"the model was trained with {config.encoder} weights of SHA-256 "
                              f"{gen['sha256'][:12]}..., this file's is {(digest or 'missing')[:12]}...", file)
    return file


def load_model(path: str | Path, checkpoint: str | Path | None = None) -> tuple[UVSAM, dict]:
    """Rebuild a trained model; ``checkpoint`` is the generalist's official file (else the cache)."""
    payload = read_model_file(path)
    config = UVSAMConfig.from_dict(payload["config"])
    meta = payload["meta"]
    file = generalist_file(payload, path, checkpoint)
    if file is None:
        generalist = build_generalist(config.encoder)
        generalist.load_state_dict(payload["generalist_state"])
    else:
        from uvsam.checkpoint import load_generalist

        generalist = load_generalist(config.encoder, file)
        generalist.weights_sha256 = meta["generalist"]["sha256"]
    model = UVSAM(config, _specialist(config), generalist)
    missing, unexpected = model.load_state_dict(payload["state"], strict=False)
    missing = [k for k in missing if not k.startswith("generalist.")]
    if missing or unexpected:
        raise CheckpointError(f"model weights do not fit its config: {len(missing)} missing, "
                              f"{len(unexpected)} unexpected ({', '.join((missing + unexpected)[:3])})", path)
    return model.eval(), meta


def _specialist(config: UVSAMConfig):
    from uvsam.modeling.specialist import Specialist

    return Specialist(config.specialist)
