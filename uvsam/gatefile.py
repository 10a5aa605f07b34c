"""The gate file: what ``uvsam train-gate`` writes and ``predict --gate`` reads (:mod:`uvsam.gate`).

A torch file of plain values (read with ``weights_only=True``): the backbone's name and weights,
the input representation, the tile size in pixels at the model's GSD, the threshold chosen for
recall, the inputs of the model it serves (its :class:`~uvsam.preprocess.InputSpec`, so that a
gate is never run on tiles read for another model), and its metrics and training settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from uvsam.checkpoint import load_tensors
from uvsam.errors import CheckpointError, InputError
from uvsam.files import sha256_file
from uvsam.modelfile import ModelFile
from uvsam.modeling.gate import TileGate

FORMAT = "uvsam-gate"
VERSION = 1


@dataclass
class GateFile:
    """A trained gate as read back: the network, its threshold and what it was made for."""

    path: Path
    sha256: str
    network: TileGate
    crop: int
    threshold: float
    inputs: dict  # the model's InputSpec, as recorded
    record: dict = field(default_factory=dict)  # everything else the file holds (metrics, config)

    @classmethod
    def read(cls, path: str | Path) -> GateFile:
        path = Path(path)
        if not path.is_file():
            raise InputError("gate file does not exist", path)
        try:
            payload = load_tensors(path)
        except CheckpointError:  # a crafted archive or tensor
            raise
        except Exception as e:  # a truncated or foreign file: torch raises many kinds
            raise InputError(f"not a gate file ({str(e).splitlines()[0][:120]})", path) from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise InputError("not a gate file (train one with `uvsam train-gate`)", path)
        if payload.get("version", 0) > VERSION:
            raise InputError(f"gate file version {payload['version']} is newer than this uvsam reads ({VERSION})",
                             path)
        net = TileGate(payload["backbone"], payload.get("input_mode", "rgb"), payload.get("lcn_sigma_px", 4.0))
        net.load_state_dict(payload["state_dict"])
        net.eval()
        record = {k: v for k, v in payload.items() if k != "state_dict"}
        return cls(path, sha256_file(path), net, int(payload["crop"]), float(payload["threshold"]),
                   payload["inputs"], record)

    def check_inputs(self, model: ModelFile) -> None:
        """Refuse a gate trained on the inputs of another model (other GSD, bands or radiometry)."""
        if self.inputs != model.inputs.to_dict():
            raise InputError(f"the gate was trained for the inputs of another model ({self.record.get('model')}), "
                             f"not {model.path.name}: train it with --model {model.path}", self.path)
