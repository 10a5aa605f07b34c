"""``uvsam segment`` on real imagery: masks keep CRS and transform; nodata stays out."""

from __future__ import annotations

import numpy as np
import rasterio

from .conftest import run_cli


def test_segment_georeferenced(mobile_sam_ckpt, data_dir, tmp_path, capsys):
    src = data_dir / "rasterio-rgb" / "RGB.byte.tif"
    out = tmp_path / "mask.tif"
    code, stdout, err = run_cli(["segment", src, "--encoder", "mobile_sam", "--checkpoint", mobile_sam_ckpt,
                                 "--box", "200,150,600,550", "--point", "400,350", "--out", out], capsys)
    assert code == 0, err
    with rasterio.open(src) as s, rasterio.open(out) as m:
        assert m.crs == s.crs and m.transform == s.transform and (m.width, m.height) == (s.width, s.height)
        mask = m.read(1)
        valid = s.read_masks(1) > 0
        assert m.read_masks(1)[~valid].max() == 0  # nodata flagged in the mask GeoTIFF
    assert mask[~valid].max() == 0
    assert set(np.unique(mask)) <= {0, 1}


def test_segment_rejects_bad_prompts(mobile_sam_ckpt, data_dir, tmp_path, capsys):
    src = data_dir / "rasterio-rgb" / "RGB.byte.tif"
    out = tmp_path / "mask.tif"
    base = ["segment", src, "--encoder", "mobile_sam", "--checkpoint", mobile_sam_ckpt, "--out", out]
    for extra, msg in [([], "at least one"), (["--box", "5,5,1,1"], "is empty"),
                       (["--box", "1,2,3"], "needs 4 numbers"), (["--box", "5000,5000,6000,6000"], "outside"),
                       (["--point", "3,4,7"], "label must be")]:
        code, _, err = run_cli(base + extra, capsys)
        assert code == 2 and msg in err, err
        assert not out.exists()
    code, _, err = run_cli(["segment", tmp_path / "nope.tif", "--encoder", "mobile_sam", "--checkpoint",
                            mobile_sam_ckpt, "--out", out, "--box", "1,1,9,9"], capsys)
    assert code == 2 and "nope.tif: file does not exist" in err


def test_segment_keeps_existing_output_on_failure(tmp_path, data_dir, capsys):
    out = tmp_path / "mask.tif"
    out.write_bytes(b"previous result")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    code, _, _ = run_cli(["segment", data_dir / "rasterio-rgb" / "RGB.byte.tif", "--encoder", "mobile_sam",
                          "--checkpoint", bad, "--out", out, "--box", "1,1,90,90"], capsys)
    assert code == 2 and out.read_bytes() == b"previous result"
