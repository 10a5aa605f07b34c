"""UV-SAM's own parts: specialist (and its pretrained-weight layouts), fusion, ladder, the whole
forward pass for every encoder of the core, and the losses."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from uvsam.errors import CheckpointError
from uvsam.losses import IGNORE, dice_loss, focal_loss, uvsam_loss, village_targets
from uvsam.modeling.fusion import LadderSideNetwork, PromptFusion
from uvsam.modeling.prompts import semantic_prompts
from uvsam.modeling.registry import ENCODERS
from uvsam.modeling.sam import build_generalist
from uvsam.modeling.specialist import Specialist, detect_layout, load_mit_weights, to_original_layout
from uvsam.modeling.uvsam import UVSAM, UVSAMConfig


def test_specialist_shapes_for_any_input_size():
    torch.manual_seed(0)
    sp = Specialist("mit_b0").eval()
    logits, feature = sp(torch.randn(1, 3, 100, 150))
    assert logits.shape == (1, 2, 100, 150)
    assert feature.shape == (1, 256, 32, 40)  # padded to 128 x 160, fused map at 1/4


def test_hugging_face_mit_weights_give_the_same_features(tmp_path):
    import transformers  # a test dependency (pyproject [test]): the reference implementation
    torch.manual_seed(0)
    hf = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(num_labels=2)).eval()
    path = tmp_path / "mit_b0_hf.bin"
    torch.save(hf.state_dict(), path)  # the published file's layout: segformer.encoder.*, decode_head.*
    sp = Specialist("mit_b0").eval()
    info = load_mit_weights(sp, path)
    assert info["layout"] == "huggingface"
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = hf.segformer(x, output_hidden_states=True).hidden_states
        ours = sp.net.encoder(x)[-4:]
    for a, b in zip(ref, ours, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _to_mmseg1(state: dict) -> dict:
    """mmsegmentation 1.x's ``mit2mmseg`` conversion, written out independently for the test."""
    out = {}
    for k, v in state.items():
        if m := re.match(r"patch_embed(\d)\.(.*)", k):
            out[f"backbone.layers.{int(m[1]) - 1}.0.{m[2].replace('proj.', 'projection.')}"] = v
        elif m := re.match(r"norm(\d)\.(.*)", k):
            out[f"backbone.layers.{int(m[1]) - 1}.2.{m[2]}"] = v
        elif m := re.match(r"block(\d)\.(\d+)\.(.*)", k):
            pre, rest = f"backbone.layers.{int(m[1]) - 1}.1.{m[2]}.", m[3]
            if rest.startswith("attn.q."):
                kv = state[k.replace("attn.q.", "attn.kv.")]
                out[pre + "attn.attn.in_proj_" + rest.split(".")[-1]] = torch.cat([v, kv])
            elif rest.startswith("attn.kv."):
                continue
            elif rest.startswith("attn.proj."):
                out[pre + rest.replace("attn.proj.", "attn.attn.out_proj.")] = v
            elif rest.startswith("mlp."):
                name = rest.replace("mlp.fc1.", "ffn.layers.0.").replace("mlp.dwconv.dwconv.", "ffn.layers.1.")
                name = name.replace("mlp.fc2.", "ffn.layers.4.")
                out[pre + name] = v.reshape(*v.shape, 1, 1) if ("fc1.weight" in rest or "fc2.weight" in rest) else v
            else:
                out[pre + rest] = v
    return out


def test_mmseg1_and_original_layouts_round_trip(tmp_path):
    torch.manual_seed(1)
    src = Specialist("mit_b0")
    original = src.net.encoder.state_dict()
    mm = _to_mmseg1(original)
    assert detect_layout({k.removeprefix("backbone."): v for k, v in mm.items()}) == "mmseg1"
    back = to_original_layout(mm)
    assert set(back) == set(original)
    for k in original:
        torch.testing.assert_close(back[k], original[k])
    path = tmp_path / "mit_b0_mmseg.pth"
    torch.save({"state_dict": mm, "meta": {"note": "mmseg 1.x"}}, path)
    assert load_mit_weights(Specialist("mit_b0"), path)["layout"] == "mmseg1"


def test_wrong_mit_variant_is_named(tmp_path):
    path = tmp_path / "mit_b1.pth"
    torch.save(Specialist("mit_b1").net.encoder.state_dict(), path)
    with pytest.raises(CheckpointError, match="do not fit mit_b0.*wrong shape"):
        load_mit_weights(Specialist("mit_b0"), path)
    junk = tmp_path / "junk.pth"
    torch.save({"a.b": torch.zeros(1)}, junk)
    with pytest.raises(CheckpointError, match="not a MiT"):
        load_mit_weights(Specialist("mit_b0"), junk)


@pytest.mark.parametrize("mode", ["mlp", "add"])
def test_fusion_starts_as_identity_and_learns(mode):
    torch.manual_seed(0)
    f = PromptFusion(mode)
    sparse, semantic = torch.randn(3, 2, 256), torch.randn(1, 2, 256)
    torch.testing.assert_close(f(sparse, semantic), sparse)
    f(sparse, semantic).pow(2).sum().backward()
    grads = [p.grad for p in f.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_ladder_is_silent_until_its_gate_opens():
    torch.manual_seed(0)
    ladder = LadderSideNetwork()
    x = torch.randn(1, 3, 1024, 1024)
    assert ladder(x).shape == (1, 256, 64, 64)
    assert ladder(x).abs().max() == 0
    with torch.no_grad():
        ladder.gate.fill_(0.5)
    assert ladder(x).abs().max() > 0


def _villages_image(size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.zeros(1, size, size, dtype=torch.uint8)
    labels[0, 16:80, 20:90] = 1
    labels[0, 100:110, 100:110] = 1
    labels[0, :, :4] = IGNORE
    return torch.rand(1, 3, size, size) * 255, labels


def _force_villages(model: UVSAM, labels: torch.Tensor) -> None:
    """Make the specialist predict the labels (its head's bias), so boxes exist."""
    head = model.specialist.net.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_uvsam_path_runs_for_every_encoder(encoder):
    """Specialist -> prompts -> fusion -> the family's decoder -> losses -> gradients, per encoder.

    The frozen encoder's embedding is given (as the training cache does); the encoders
    themselves are exercised at native size by test_families / test_parity.
    """
    torch.manual_seed(0)
    config = UVSAMConfig(encoder=encoder, gsd_m=1.0, min_area_m2=100.0)
    model = UVSAM(config, Specialist("mit_b0"), build_generalist(encoder)).train()
    images, labels = _villages_image()
    _force_villages(model, labels)
    emb = torch.randn(1, 256, 64, 64)
    out = model(images, frozen_embeddings=emb)
    v = out.villages[0]
    assert len(v.boxes) == 1 and v.large.all()  # the forced mask is one image-wide village
    assert v.mask_logits.shape == (1, 1, 128, 128) and v.iou_pred.shape == (1,)
    parts = uvsam_loss(out, labels)
    assert torch.isfinite(parts["total"]) and parts["villages"] == 1
    parts["total"].backward()
    assert model.fusion.mlp[2].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.generalist.parameters())  # frozen
    assert UVSAM.combine(out).shape == (1, 128, 128)


def test_small_villages_keep_the_specialist_mask():
    torch.manual_seed(0)
    model = UVSAM(UVSAMConfig(encoder="mobile_sam", gsd_m=1.0, min_area_m2=50 * 50.0), Specialist("mit_b0"),
                  build_generalist("mobile_sam")).eval()
    images, _ = _villages_image()
    logits = torch.full((1, 2, 128, 128), -5.0)
    logits[:, 0] = 5.0
    logits[0, 1, 10:90, 10:90], logits[0, 0, 10:90, 10:90] = 5.0, -5.0  # large village
    logits[0, 1, 100:110, 100:110], logits[0, 0, 100:110, 100:110] = 5.0, -5.0  # small village
    model.run_specialist = lambda x: (logits, torch.zeros(1, 256, 32, 32))
    with torch.no_grad():
        out = model(images, frozen_embeddings=torch.randn(1, 256, 64, 64))
    v = out.villages[0]
    assert v.large.tolist() == [True, False]
    final = UVSAM.combine(out)[0]
    assert final[100:110, 100:110].all()  # the small one: the specialist's own pixels
    sam = v.mask_logits[0, 0] > 0
    inside = torch.zeros_like(final)
    inside[10:90, 10:90] = True
    assert torch.equal(final[inside], sam[inside])  # the large one: the generalist's mask


def test_focal_and_dice_values():
    logits = torch.tensor([[[10.0, -10.0], [10.0, -10.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    valid = torch.ones_like(target)
    assert focal_loss(logits, target, valid).item() < 1e-8
    assert dice_loss(logits, target, valid).item() < 1e-3
    assert focal_loss(-logits, target, valid).item() > 1.0
    assert dice_loss(-logits, target, valid).item() > 0.6
    half = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # ignored pixels do not count
    torch.testing.assert_close(focal_loss(-logits, target, half), focal_loss(-logits[..., :1, :], target[..., :1, :],
                                                                              valid[..., :1, :]))


def test_village_targets_are_labels_inside_each_box():
    labels = torch.zeros(20, 20, dtype=torch.uint8)
    labels[2:8, 2:8] = 1
    labels[10:18, 10:18] = 1
    labels[0, :] = IGNORE
    target, valid = village_targets(labels, np.array([[0, 0, 9, 9], [9, 9, 20, 20]], np.float32))
    assert target[0].sum() == 36 and target[1].sum() == 64
    assert target[0, 12, 12] == 0  # the other village is not this box's target
    assert valid[:, 0].sum() == 0


def test_local_contrast_input_ignores_brightness_and_contrast(beijing_tile):
    """The default specialist input: an affine change of the grey levels (a season's or a
    sensor's gain and offset) leaves it unchanged."""
    from uvsam.modeling.specialist import specialist_input

    x = torch.from_numpy(beijing_tile[:256, :256].astype(np.float32)).permute(2, 0, 1)[None]
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    a = specialist_input(x, "lcn", mean, std, sigma_px=4.0)
    b = specialist_input(0.6 * x + 40, "lcn", mean, std, sigma_px=4.0)
    assert a.shape == (1, 3, 256, 256)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)
    assert a.std() > 0.5  # texture survives
    rgb = specialist_input(x, "rgb", mean, std, sigma_px=4.0)
    assert not torch.allclose(specialist_input(0.6 * x + 40, "rgb", mean, std, 4.0), rgb)


def test_boxes_decoded_in_chunks_match_one_box_per_call():
    """Batched decoding (``decode_chunk`` boxes a call, bounded memory) draws the masks that
    one call per box, as the official code decodes, draws."""
    torch.manual_seed(0)
    model = UVSAM(UVSAMConfig(encoder="mobile_sam", gsd_m=1.0), Specialist("mit_b0"),
                  build_generalist("mobile_sam")).eval()
    images, _ = _villages_image()
    emb = torch.randn(1, 256, 64, 64)
    logits, feature = model.run_specialist(images)
    semantic = semantic_prompts(emb, feature)
    boxes = [np.array([[4, 4, 60, 50], [30, 40, 120, 126], [70, 2, 126, 64], [0, 0, 128, 128], [50, 50, 80, 90]],
                      np.float32)]
    with torch.inference_mode():
        model.decode_chunk = 1
        (one, iou_one), = model.decode_boxes((128, 128), logits, semantic, emb, boxes, model.dense_prompt(logits))
        model.decode_chunk = 2  # chunks of 2, 2 and 1
        (chunked, iou_chunked), = model.decode_boxes((128, 128), logits, semantic, emb, boxes,
                                                     model.dense_prompt(logits))
    assert one.shape == chunked.shape == (5, 1, 128, 128)
    torch.testing.assert_close(chunked, one, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou_chunked, iou_one, atol=1e-5, rtol=1e-5)
    assert ((one > 0) == (chunked > 0)).float().mean() > 0.9999


@pytest.mark.parametrize("encoder", ["mobile_sam", "efficientvit_sam_l0"])  # prompt frame = input; 1024 vs 512
def test_cascaded_post_refinement_feeds_each_pass_the_last_mask(encoder):
    """PerSAM's cascade: after the first pass, a pass with the mask's own low-res logits as the
    mask prompt (three outputs, the highest predicted IoU kept), then one that adds the box of
    that mask; the semantic prompts go into every pass; the result is the last pass's best."""
    torch.manual_seed(0)
    model = UVSAM(UVSAMConfig(encoder=encoder, gsd_m=1.0), Specialist("mit_b0"),
                  build_generalist(encoder)).eval()
    images, _ = _villages_image()
    boxes = [np.array([[4, 4, 60, 50], [30, 40, 120, 126]], np.float32)]
    calls = []
    decode = model.generalist.decode

    def spy(emb, **kw):
        out = decode(emb, **kw)
        calls.append((kw, out))
        return out

    model.generalist.decode = spy
    with torch.inference_mode():
        (masks, iou), = model.refine(images, boxes, cascade=True)
    first, second, third = calls
    assert not first[0].get("multimask_output", False)
    assert second[0]["multimask_output"] and third[0]["multimask_output"]
    assert all(c[0]["fuse_sparse"] is not None for c in calls)  # the semantic prompts in every pass
    torch.testing.assert_close(second[0]["mask_logits"], first[1][0][:, :1])
    torch.testing.assert_close(second[0]["boxes"], first[0]["boxes"])  # the village's own box first
    low2, iou2 = second[1]
    best2 = low2[torch.arange(2), iou2.argmax(1)]
    torch.testing.assert_close(third[0]["mask_logits"][:, 0], best2)
    # the third pass's box, taken back to image pixels, is the refined mask's extent on the image
    sx, sy = model.generalist.prompt_scale(128, 128)
    on_image = model.generalist.postprocess_masks(best2[:, None], 128, 128)[:, 0] > 0
    for i in range(2):
        ys, xs = torch.nonzero(on_image[i], as_tuple=True)
        extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        box = third[0]["boxes"][i].cpu() / torch.tensor([sx, sy, sx, sy])
        assert (box - extent).abs().max() <= 1.0, (box, extent)
    low3, iou3 = third[1]
    k = iou3.argmax(1)
    torch.testing.assert_close(iou, iou3[torch.arange(2), k])
    expected = model.generalist.postprocess_masks(low3[torch.arange(2), k][:, None], 128, 128)
    torch.testing.assert_close(masks, expected)
    calls.clear()
    with torch.inference_mode():
        model.refine(images, boxes)
    assert len(calls) == 1  # off by default


@pytest.mark.parametrize("variant", ["mit_b0", "mit_b2"])
def test_reordered_segformer_decoder_is_smp_s_decoder(variant):
    """The specialist fuses its stages at their own resolution (half the FLOPs, no 1024-channel
    concatenation): the same function as smp's decoder, in training and in evaluation."""
    from uvsam.modeling.specialist import fuse_features

    torch.manual_seed(0)
    spec = Specialist(variant)
    norm = spec.net.decoder.fuse_stage[1]
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 96, 160)
    for mode in (False, True):
        spec.train(mode)
        feats = spec.net.encoder(x)
        ref, ours = spec.net.decoder(feats), fuse_features(spec.net.decoder, feats)
        assert ours.shape == ref.shape == (2, 256, 24, 40)
        torch.testing.assert_close(ours, ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)
    ours.square().mean().backward()
    assert all(m.linear.weight.grad is not None for m in spec.net.decoder.mlp_stage)
