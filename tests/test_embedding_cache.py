"""The embedding cache: the encoder runs once per (encoder, weights, preprocessing, content)."""

from __future__ import annotations

import torch

from uvsam.embedding_cache import EmbeddingCache
from uvsam.modeling import build_generalist
from uvsam.predictor import Predictor


def test_cache_hits_and_keys(tmp_path, beijing_tile):
    torch.manual_seed(0)
    model = build_generalist("mobile_sam")
    cache = EmbeddingCache(tmp_path)
    calls = []
    model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    tile = beijing_tile[:512, :512]
    p = Predictor(model, embedder=cache)
    e1 = p.set_images([tile, tile[::-1].copy()]).clone()
    assert len(calls) == 1 and cache.misses == 2
    e2 = p.set_images([tile, tile[::-1].copy()])
    assert len(calls) == 1 and cache.hits == 2  # no encoder run the second time
    assert torch.equal(e1, e2)
    with torch.inference_mode():
        assert torch.allclose(e1[:1], model.encode(torch.from_numpy(tile.copy()).permute(2, 0, 1)[None]), atol=1e-5)

    # other weights: a different key, the encoder runs again
    other = build_generalist("mobile_sam")
    assert cache.key(other, torch.from_numpy(tile.copy())) != cache.key(model, torch.from_numpy(tile.copy()))
    # computed under bf16 autocast (`--precision bf16`): not what an fp32 run may take from the cache
    image = torch.from_numpy(tile.copy())
    plain = cache.key(model, image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cache.key(model, image) != plain
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert cache.key(model, image) == plain
