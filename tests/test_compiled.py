"""Compiled inference (issue 25): the model's parts as AOTInductor artefacts built once per
architecture, shape and machine, reused from the cache with the model's own weights, and the same
villages as eager PyTorch."""

from __future__ import annotations

import time

import numpy as np
import pyogrio
import pytest
import shapely
import torch
from torch import nn

from uvsam.compiled import CompileKey, Shapes, compile_model, compiled_part, schema_digest
from uvsam.errors import ConfigError
from uvsam.modelfile import load_model

SHAPES = Shapes(tile=512, batch=2, window=512, boxes=8)  # what predict feeds the model on a CPU


@pytest.fixture(scope="session")
def compiled(model, tmp_path_factory):
    """The conftest model's parts compiled into a cache of their own, once for the session
    (about a minute on 2 cores: three artefacts)."""
    root = tmp_path_factory.mktemp("uvsam-cache")
    net = load_model(model)[0].eval()
    t = time.perf_counter()
    builds = compile_model(net, SHAPES, torch.device("cpu"), build=True, root=root / "compiled")
    return {"root": root, "net": net, "builds": builds, "seconds": time.perf_counter() - t}


def _tiles(data_dir, n: int, size: int = 512) -> torch.Tensor:
    """``n`` real Beijing crops, (n, 3, size, size) on the 0..255 scale."""
    from PIL import Image

    paths = sorted((data_dir / "beijing-uv/image/train").glob("*.png"))[:n]
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))[:size, :size].copy())
                        .permute(2, 0, 1).float() for p in paths])


def _eager(net, fn):
    parts, net.compiled = net.compiled, {}
    try:
        return fn()
    finally:
        net.compiled = parts


def test_compiled_parts_agree_with_eager_and_are_reused_with_any_weights(compiled, model, data_dir):
    builds, net = compiled["builds"], compiled["net"]
    assert [b.status for b in builds] == ["built"] * 3, builds  # one specialist (tiles = windows), encoder, decoder
    assert sorted(net.compiled) == ["decoder", "encoder", "specialist"]
    x = _tiles(data_dir, 2)
    with torch.inference_mode():
        for batch in (x, x[:1]):  # the full batch, and a short one (the batch is a dynamic dimension)
            (lc, fc), (le, fe) = net.run_specialist(batch), _eager(net, lambda b=batch: net.run_specialist(b))
            assert lc.shape == le.shape == (len(batch), 2, 512, 512)
            assert (lc - le).abs().max() < 1e-3 and (fc - fe).abs().max() < 1e-3
            assert (lc.argmax(1) == le.argmax(1)).float().mean() > 0.9999
        emb = net.frozen_embeddings(x[:1])
        assert (emb - _eager(net, lambda: net.frozen_embeddings(x[:1]))).abs().max() < 1e-3
        boxes = [np.array([[40, 60, 300, 280], [200, 10, 500, 200], [0, 0, 511, 511]], np.float32)]
        (mc, ic), = net.refine(x[:1], boxes)
        (me, ie), = _eager(net, lambda: net.refine(x[:1], boxes))
        assert mc.shape == me.shape == (3, 1, 512, 512)
        assert ((mc > 0) == (me > 0)).float().mean() > 0.9999 and (ic - ie).abs().max() < 1e-3
    calls = {k: v.calls for k, v in net.compiled.items()}
    assert calls["specialist"] >= 3 and calls["encoder"] >= 2 and calls["decoder"] >= 1
    with torch.inference_mode():  # shapes the artefacts were not built for run eager
        net.run_specialist(x[:, :, :256, :256])
        net.run_specialist(torch.cat([x, x[:1]]))
    assert net.compiled["specialist"].calls == calls["specialist"]

    # a fresh process's view: the same artefacts from the cache, in well under a second each
    other = load_model(model)[0].eval()
    with torch.no_grad():  # other weights: artefacts hold none, they compute with the model's own
        for p in other.specialist.parameters():
            p.mul_(1.1)
    again = compile_model(other, SHAPES, torch.device("cpu"), build=False, root=compiled["root"] / "compiled")
    assert [b.status for b in again] == ["hit"] * 3 and sum(b.seconds for b in again) < 10
    with torch.inference_mode():
        (lc, _), (le, _) = other.run_specialist(x), _eager(other, lambda: other.run_specialist(x))
        assert (lc - le).abs().max() < 1e-3
        assert (lc - net.run_specialist(x)[0]).abs().max() > 0.01  # really the other weights


def test_predict_with_compiled_parts_writes_the_villages_eager_pytorch_writes(compiled, model, beijing, tmp_path,
                                                                              monkeypatch):
    from uvsam.config import PredictConfig
    from uvsam.prediction import run_prediction

    monkeypatch.setenv("UVSAM_CACHE", str(compiled["root"]))
    scene = [str(beijing / "train/images.vrt")]
    runs = {}
    for mode in ("always", "never"):
        out = tmp_path / f"{mode}.gpkg"
        summary = run_prediction(scene, model, out, PredictConfig(force_refine=True, compile=mode), log=lambda m: None)
        runs[mode] = (summary, pyogrio.read_dataframe(out, layer="villages"), pyogrio.read_dataframe(out, layer="runs"))
    (s_c, v_c, r_c), (s_e, v_e, r_e) = runs["always"], runs["never"]
    assert s_c["compiled"].count("hit") == 3, s_c["compiled"]  # the session's artefacts, nothing built
    assert r_c["compiled"][0] == s_c["compiled"] and r_e["compiled"][0] == "off (--compile never)"
    assert s_c["run_id"] == s_e["run_id"]  # how fast is not what: the same run, resumable either way
    assert len(v_c) == len(v_e) > 0
    a, b = shapely.union_all(v_c.geometry.values), shapely.union_all(v_e.geometry.values)
    assert a.intersection(b).area / a.union(b).area > 0.999


def test_training_encodes_its_views_with_the_compiled_encoder_only_when_some_are_missing(compiled, model, data_dir,
                                                                                          tmp_path, monkeypatch):
    from uvsam.config import TrainConfig
    from uvsam.devices import Device
    from uvsam.embedding_cache import EmbeddingCache
    from uvsam.training import EmbeddingStore, install_encoder

    class View:
        def __init__(self, k):
            self.k = k

        def key(self):
            return self.k

    monkeypatch.setenv("UVSAM_CACHE", str(compiled["root"]))  # the session's artefacts: the predict one, reused
    net = load_model(model)[0]
    net.train()  # as training holds it (the frozen encoder stays in eval mode)
    images, views = _tiles(data_dir, 3), [View(str(i)) for i in range(3)]
    notes: list[str] = []
    cfg = TrainConfig(images="i", labels="l", out="o", encoder=net.generalist.spec.name)
    disk = EmbeddingCache(tmp_path / "embeddings", "float16")
    store = EmbeddingStore(disk, prepare=lambda: install_encoder(net, cfg, Device(), len(views), notes.append))
    rng = torch.get_rng_state()
    got = store.get(net, views, images)
    assert net.compiled["encoder"].calls == 3 and notes == []  # 3 views < 64: no build, the cached artefact used
    assert torch.equal(torch.get_rng_state(), rng)  # training's dropout draws as it would without it
    eager = _eager(net, lambda: EmbeddingStore().get(net, views, images))  # no compiled part, nothing on disk
    assert net.compiled["encoder"].calls == 3
    assert got.shape == (3, 256, 64, 64) and (got - eager).abs().max() < 0.02  # float16 + bfloat16 storage

    def refuse():
        raise AssertionError("nothing to encode: no encoder to prepare")

    again = EmbeddingStore(disk, prepare=refuse).get(net, views, images)  # every view on disk: nothing compiled
    assert torch.equal(again, got)
    never = load_model(model)[0]
    install_encoder(never, TrainConfig(images="i", labels="l", out="o", compile="never"), Device(), 100)
    assert never.compiled == {}
    bf16 = load_model(model)[0]  # a bf16 training takes a bf16 encoder only: the fp32 one in the cache is not it
    install_encoder(bf16, cfg, Device("cpu", "bf16"), len(views), notes.append)
    assert bf16.compiled == {} and notes == []


class _Untraceable(nn.Module):
    def forward(self, x):
        return torch.from_numpy(np.sort(x.numpy()))  # leaves torch: export cannot follow it


def test_a_part_that_cannot_compile_runs_eager_and_says_why(tmp_path):
    key = CompileKey("untraceable", schema_digest(_Untraceable()), ((2, 3),), "", "torch.float32", "cpu", 1, "m", "t")
    runner, build = compiled_part(_Untraceable(), (torch.randn(2, 3),), key, build=False, root=tmp_path)
    assert runner is None and build.status == "skipped"  # not cached and not asked to build
    runner, build = compiled_part(_Untraceable(), (torch.randn(2, 3),), key, build=True, root=tmp_path)
    assert runner is None and build.status == "failed" and build.note
    assert not list(tmp_path.glob("*.pt2"))  # nothing half-written left for a later run to load
    with pytest.raises(ConfigError, match="compile"):
        from uvsam.config import PredictConfig

        PredictConfig(compile="sometimes")


def test_bf16_parts_are_artefacts_of_their_own_computing_as_the_eager_model_under_autocast(compiled, data_dir):
    """``--precision bf16``: the parts compute under autocast inside their artefact (fp32 in and out),
    never take an fp32 artefact's place, and give what the eager model gives under autocast; the
    specialist's input (normalisation, local contrast) stays fp32 either way."""
    from uvsam.compiled import BoxDecoder, InPrecision, machine_signature
    from uvsam.devices import select

    net, cpu = compiled["net"], torch.device("cpu")
    parts = dict(net.compiled)
    try:  # the session's fp32 artefacts are in the cache: none is a bf16 part
        assert [b.status for b in compile_model(net, SHAPES, cpu, build=False, root=compiled["root"] / "compiled",
                                                precision="bf16")] == ["skipped"] * 3
        with pytest.raises(ValueError, match="fp16"):
            compile_model(net, SHAPES, cpu, build=False, root=compiled["root"] / "compiled", precision="fp16")
    finally:
        net.compiled = parts
    x = _tiles(data_dir, 1)
    seen = []
    hook = net.specialist.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.inference_mode():
        logits32, _ = _eager(net, lambda: net.run_specialist(x))
        with select("cpu", "bf16").autocast():
            logits16, _ = _eager(net, lambda: net.run_specialist(x))
            emb = _eager(net, lambda: net.frozen_embeddings(x))
    hook.remove()
    assert seen[0].dtype == seen[1].dtype == torch.float32 and torch.equal(seen[0], seen[1])
    assert (logits16.float().argmax(1) == logits32.argmax(1)).float().mean() > 0.99

    # one part built in bf16 (the decoder, the quickest to build): it computes what the eager model does
    # under autocast, to bf16's rounding
    dec = InPrecision(BoxDecoder(net), "bf16")
    emb, dense = emb.float(), net.dense_prompt(logits32)
    semantic = torch.randn(1, 2, 256, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[40, 60, 300, 280], [200, 10, 500, 200], [0, 0, 511, 511]], dtype=torch.float32) * 2
    key = CompileKey("decoder-bf16-test", schema_digest(dec), ((1, 256, 64, 64), (3, 4), (1, 1, 256, 256), (1, 2, 256)),
                     "boxes 1..8", "bf16 autocast", "cpu", torch.get_num_threads(), machine_signature(cpu),
                     torch.__version__)
    runner, build = compiled_part(dec, (emb, boxes, dense, semantic), key, build=True, root=compiled["root"] / "bf16",
                                  dynamic_shapes=((None, {0: torch.export.Dim("boxes", min=1, max=8)}, None, None),))
    assert build.status == "built", build.note
    with torch.inference_mode():
        masks, iou = runner(emb, boxes[:2], dense, semantic)
        with select("cpu", "bf16").autocast():
            masks_e, iou_e = net.decode_box_chunk_eager(emb, boxes[:2], dense, semantic)
    assert masks.dtype == iou.dtype == torch.float32 and masks.shape == (2, 1, 256, 256)
    assert ((masks > 0) == (masks_e > 0)).float().mean() > 0.99 and (iou - iou_e.float()).abs().max() < 0.05
