"""Tiles as a torch ``Dataset``: tile ``i`` of a :class:`~tiles.plan.ScenePlan`, read in
whichever process asks (DataLoader workers reopen the raster themselves)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from tiles.plan import ScenePlan
from tiles.reader import RasterSource


class TileDataset(Dataset):
    """Tile ``i`` of a :class:`ScenePlan` as a dict of tensors.

    ``image``: (bands, size, size) float32 in 0..1 (the scene's stretch; 0 where invalid);
    ``valid``: (size, size) bool; ``raw`` (with ``keep_raw``): the data as read; ``index``: the
    tile's grid index. Works with ``DataLoader(num_workers=N)``: each worker opens the raster.
    """

    def __init__(self, path: str | Path, scene: ScenePlan, keep_raw: bool = False):
        self.path = Path(path)
        self.scene = scene
        self.keep_raw = keep_raw
        self._src: RasterSource | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.scene.tiles)

    def _source(self) -> RasterSource:
        if self._src is None or self._pid != os.getpid():
            self._src = RasterSource(self.path, self.scene.read)
            self._pid = os.getpid()
        return self._src

    def __getitem__(self, i: int) -> dict:
        tile = self.scene.tiles[i]
        data, valid = self._source().read(tile.window)
        item = {"image": torch.from_numpy(self.scene.stretch.apply(data, valid)),
                "valid": torch.from_numpy(valid), "index": tile.index}
        if self.keep_raw:
            item["raw"] = torch.from_numpy(data)
        return item

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_src"], state["_pid"] = None, None
        return state
