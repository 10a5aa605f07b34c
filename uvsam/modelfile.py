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
import math
import os
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from uvsam.checkpoint import load_generalist, load_tensors
from uvsam.errors import CheckpointError
from uvsam.files import atomic_path, sha256_file
from uvsam.generalist import GeneralistStatus, generalist_status
from uvsam.harmonise import Radiometry
from uvsam.modeling.sam import build_generalist
from uvsam.modeling.specialist import Specialist
from uvsam.modeling.uvsam import UVSAM, UVSAMConfig
from uvsam.preprocess import InputSpec
from uvsam.weights import resolve

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
    payload = _on_cpu(payload)  # trained on a GPU, the file still loads on a machine without one
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _on_cpu(obj):
    """``obj`` with every tensor in it moved to the CPU (dicts, lists and tuples walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


@dataclass(frozen=True)
class ModelFile:
    """A model file as read (once per process, :meth:`read`): the train -> predict contract.

    ``config`` (the network; the GSD is stored there only), ``inputs`` (bands, normalisation,
    harmonisation and training radiometry: :class:`uvsam.preprocess.InputSpec`), the
    generalist's identity (``generalist``: encoder, sha256, source, file), the native
    resolution of the training imagery (``source_gsd_m``), the file's own ``sha256``, and
    ``inferred``: fields an older file did not record and that were filled in.
    """

    path: Path
    sha256: str
    config: UVSAMConfig
    inputs: InputSpec
    generalist: dict
    source_gsd_m: float | None
    meta: dict
    inferred: tuple[str, ...] = ()
    loaded: list = field(default_factory=list, repr=False, compare=False)  # the payload read, until handed over
    shapes: dict = field(default_factory=dict, repr=False, compare=False)  # "state"/"generalist_state" key -> shape

    def check_weights(self) -> None:
        """Refuse weights that do not fit the network the config describes (a damaged or edited
        file), before any work: every tensor of the file against a skeleton of the network (the
        specialist built, the generalist on the meta device: no memory, a fraction of a second)."""
        with torch.device("meta"):
            generalist = build_generalist(self.config.encoder)
        skeleton = UVSAM(self.config, Specialist(self.config.specialist), generalist)
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        own = {f"generalist.{k}": v for k, v in self.shapes.get("generalist_state", {}).items()}
        for key, shape in {**self.shapes.get("state", {}), **own}.items():
            if key not in expected:
                raise CheckpointError(f"model weights do not fit its config: {key} is not a weight of a "
                                      f"{self.config.specialist} / {self.config.encoder} UV-SAM", self.path)
            if expected[key] != shape:
                raise CheckpointError(f"model weights do not fit its config: {key} is {_dims(shape)}, the network's "
                                      f"is {_dims(expected[key])}", self.path)
        missing = [k for k in expected if not k.startswith("generalist.") and k not in self.shapes.get("state", {})]
        if missing:
            raise CheckpointError(f"model weights do not fit its config: {len(missing)} missing "
                                  f"({', '.join(missing[:3])})", self.path)

    @property
    def gsd_m(self) -> float:
        return self.config.gsd_m

    def payload(self) -> dict:
        """The whole file (tensors included): the one :meth:`read` loaded, handed over once (the
        record keeps no tensor, so their memory-mapped pages leave with the model built from
        them); a later call reads the file again."""
        if self.loaded:
            return self.loaded.pop()
        return _load_payload(self.path)[0]

    @property
    def status(self) -> GeneralistStatus:
        """Whether its generalist's weights are the verified official ones."""
        return generalist_status({"generalist": self.generalist}, self.config.encoder)

    def record(self) -> dict:
        """What outputs record of the model (runs table, evaluation JSON)."""
        return {"file": str(self.path), "sha256": self.sha256, "encoder": self.config.encoder,
                "specialist": self.config.specialist, "gsd_m": self.gsd_m, "generalist": self.generalist,
                "epoch": self.meta.get("epoch"),
                "inputs": {k: v for k, v in self.inputs.to_dict().items() if k != "radiometry"},
                "inferred": list(self.inferred)}

    @classmethod
    def read(cls, path: str | Path) -> ModelFile:
        """The model file at ``path``, read and hashed once per process (again only if it changed)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError("model file does not exist", path)
        st = path.stat()
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _READ:
            if len(_READ) >= 8:  # a long-lived process (a notebook, cross-validation) does not accumulate them
                _READ.pop(next(iter(_READ)))
            _READ[key] = _from_payload(path, *_load_payload(path))
        record = _READ[key]
        # the same file under another name (a symlink): the record names the path given this time
        return record if record.path == path else replace(record, path=path)


_READ: dict[tuple, ModelFile] = {}


def _load_payload(path: Path) -> tuple[dict, str]:
    """(payload, SHA-256): the file loaded once (memory-mapped: its tensors are read from the
    page cache as they are used, never copied whole) and hashed once (:func:`sha256_file`)."""
    if path.stat().st_size == 0:
        raise CheckpointError("model file is empty (0 bytes)", path)
    try:
        payload = load_tensors(path)
    except CheckpointError:
        raise
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
    return payload, sha256_file(path)


def _from_payload(path: Path, payload: dict, digest: str) -> ModelFile:
    meta = dict(payload["meta"])
    raw = dict(payload["config"])
    inferred = []
    if "gsd_m" not in raw and "gsd_m" in meta:  # the earliest files kept it beside the config only
        raw["gsd_m"] = meta["gsd_m"]
        inferred.append("gsd_m")
    try:
        config = UVSAMConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"model file's config is damaged ({str(e)[:120]})", path) from None
    source = meta.get("source_gsd_m")
    problems = config.problems() + ([f"source_gsd_m is {source!r}: it must be a number > 0"]
                                    if source is not None and not _positive(source) else [])
    if problems:
        raise CheckpointError(f"model file's {problems[0]}", path)
    for name, default in (("normalisation", "auto"), ("bands", None), ("harmonise", False), ("source_gsd_m", None)):
        if name not in meta:
            meta[name] = default
            inferred.append(name)
    inputs = InputSpec(config.gsd_m, tuple(meta["bands"]) if meta["bands"] else None, meta["normalisation"],
                       bool(meta["harmonise"]), Radiometry.from_dict(meta["radiometry"]))
    source_gsd = meta["source_gsd_m"]
    shapes = {part: {k: tuple(v.shape) for k, v in payload[part].items() if isinstance(v, torch.Tensor)}
              for part in ("state", "generalist_state") if isinstance(payload.get(part), dict)}
    return ModelFile(path, digest, config, inputs, dict(meta["generalist"]),
                     float(source_gsd) if source_gsd is not None else None, meta, tuple(inferred), [payload], shapes)


def _dims(shape: tuple) -> str:
    return " x ".join(map(str, shape)) or "a scalar"


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def read_model_file(path: str | Path) -> dict:
    """The raw payload of a model file, tensors included (see :class:`ModelFile`)."""
    return ModelFile.read(path).payload()


def generalist_file(model: ModelFile, checkpoint: str | Path | None) -> Path | None:
    """The official weights file a model needs (``checkpoint``, else the cache), checked by
    SHA-256 against the one it was trained with; None when the model carries its generalist.

    Cheap (a hash, once per process, no model built): ``uvsam predict`` calls it before any work.
    """
    config, gen, path = model.config, model.generalist, model.path
    if gen["source"] == "random":
        if checkpoint is not None:
            raise CheckpointError("the model carries its own generalist (trained without official weights); "
                                  "--checkpoint would not be used: leave it out", path)
        return None
    file = Path(checkpoint) if checkpoint is not None else resolve(config.encoder)
    digest = sha256_file(file) if file.is_file() else None
    if digest != gen["sha256"]:
        raise CheckpointError(f"the model was trained with {config.encoder} weights of SHA-256 "
                              f"{gen['sha256'][:12]}..., this file's is {(digest or 'missing')[:12]}...", file)
    return file


def load_model(path: str | Path | ModelFile, checkpoint: str | Path | None = None) -> tuple[UVSAM, dict]:
    """Rebuild a trained model; ``checkpoint`` is the generalist's official file (else the cache)."""
    model_file = path if isinstance(path, ModelFile) else ModelFile.read(path)
    config, payload = model_file.config, model_file.payload()
    file = generalist_file(model_file, checkpoint)
    if file is None:
        generalist = build_generalist(config.encoder)
        generalist.load_state_dict(payload["generalist_state"])
    else:
        generalist = load_generalist(config.encoder, file)
        generalist.weights_sha256 = model_file.generalist["sha256"]
    model = UVSAM(config, Specialist(config.specialist), generalist)
    try:
        missing, unexpected = model.load_state_dict(payload["state"], strict=False)
    except RuntimeError as e:  # a size mismatch (ModelFile.check_weights says which, before any work)
        raise CheckpointError(f"model weights do not fit its config ({str(e).splitlines()[-1].strip()[:160]})",
                              model_file.path) from None
    missing = [k for k in missing if not k.startswith("generalist.")]
    if missing or unexpected:
        raise CheckpointError(f"model weights do not fit its config: {len(missing)} missing, "
                              f"{len(unexpected)} unexpected ({', '.join((missing + unexpected)[:3])})",
                              model_file.path)
    return model.eval(), model_file.meta
