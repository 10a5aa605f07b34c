"""Progress where long work happens: timestamped records when stderr is not a terminal (nohup,
cron, Slurm), also while one long unit runs; nothing with --quiet; a resumed run's units are done
but not throughput."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime

from uvsam.progress import SETTINGS, Progress, ProgressSettings

RECORD = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) predict: tiles (\d+)/(\d+) \(\d+%\)")


def test_predict_under_nohup_writes_progress_records_at_the_set_interval(beijing, model, tmp_path):
    """Two scenes under nohup, a record every second (the default, 30 s, is under the minute
    the issue asks for): timestamped lines with done/total, tiles/s, km2/h and ETA, no gap over
    the interval (plus scheduling slack), the count reaching the total; --quiet: none."""
    assert "UVSAM_PROGRESS_SECONDS" in os.environ or ProgressSettings().interval <= 60
    env = {**os.environ, "UVSAM_PROGRESS_SECONDS": "1"}
    log = tmp_path / "nohup.out"
    args = ["nohup", sys.executable, "-m", "uvsam", "predict", str(beijing / "train/images.vrt"),
            str(beijing / "val/images.vrt"), "--model", str(model), "--local", "--no-refine"]
    with open(log, "w") as f:
        run = subprocess.run([*args, "--out", str(tmp_path / "v.gpkg")], stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, timeout=900)
    assert run.returncode == 0, log.read_text()[-2000:]
    records = [RECORD.match(line) for line in log.read_text().splitlines()]
    records = [m for m in records if m]
    assert len(records) >= 3, log.read_text()[-2000:]
    times = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S") for m in records]
    assert max((b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)) <= 3
    done = [int(m.group(2)) for m in records]
    assert done == sorted(done) and done[-1] == int(records[-1].group(3))  # the last record: all tiles
    assert all(k in log.read_text() for k in ("tiles/s", "km2/h", "ETA"))
    with open(log, "w") as f:
        subprocess.run([*args, "--out", str(tmp_path / "q.gpkg"), "--quiet"], stdout=f, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, env=env, timeout=900, check=True)
    text = log.read_text()
    assert not any(RECORD.match(line) for line in text.splitlines()) and "villages" not in text.split("{")[0]


def test_resumed_units_are_done_but_not_throughput(monkeypatch):
    monkeypatch.setattr(SETTINGS, "quiet", False)
    monkeypatch.setattr(SETTINGS, "bar", False)
    monkeypatch.setattr(SETTINGS, "interval", 3600)
    with Progress(100, "tiles", task="predict") as p:
        p.skip(90)  # found in the journal
        time.sleep(0.2)
        p.advance(2)
        line = p.record()
    assert "tiles 92/100" in line
    rate = float(re.search(r" ([\d.,]+) tiles/s", line).group(1).replace(",", ""))
    assert rate < 2 / 0.2 * 1.01  # 2 tiles in >= 0.2 s: the 90 resumed ones add nothing
    eta = re.search(r"ETA (\S+)", line).group(1)
    assert eta in ("00:00", "00:01")  # 8 left at >= ~10 tiles/s
