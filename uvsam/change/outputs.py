"""The change analysis on disk: a GeoPackage of events, tracked villages and summaries, and a CSV per table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyogrio
from pyproj import CRS

from uvsam.change.track import ChangeResult
from uvsam.errors import InputError
from uvsam.files import atomic_path


def write_outputs(out: str | Path, result: ChangeResult, tables: dict[str, pd.DataFrame], run: dict,
                  crs: str | None = None) -> list[Path]:
    """The GeoPackage (``changes``, ``villages_tracked``, one table per summary, ``runs``) and a
    CSV per summary beside it (``OUT_years.csv``, ...); every file replaced atomically.

    Layers are written in ``crs`` (default: the analysis CRS); areas stay ground square metres.
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError("output folder does not exist", out.parent)
    target = CRS.from_user_input(crs) if crs else result.crs
    tables = {"years": result.years, **tables}
    run_row = pd.DataFrame([{k: v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v)
                             for k, v in run.items()}])
    with atomic_path(out) as tmp:
        tmp.unlink()
        pyogrio.write_dataframe(result.changes.to_crs(target), tmp, layer="changes", driver="GPKG")
        pyogrio.write_dataframe(result.villages.to_crs(target), tmp, layer="villages_tracked", driver="GPKG")
        for name, table in tables.items():
            pyogrio.write_dataframe(table, tmp, layer=name, driver="GPKG")
        pyogrio.write_dataframe(run_row, tmp, layer="runs", driver="GPKG")
    written = [out]
    for name, table in tables.items():
        csv = out.with_name(f"{out.stem}_{name}.csv")
        with atomic_path(csv) as tmp:
            table.to_csv(tmp, index=False)
        written.append(csv)
    changes_csv = out.with_name(f"{out.stem}_changes.csv")
    with atomic_path(changes_csv) as tmp:
        result.changes.drop(columns="geometry").to_csv(tmp, index=False)
    return [*written, changes_csv]
