"""PerSAM's decoder: SAM's mask decoder with target-guided attention and target-semantic prompting.

Training-free personalisation (Zhang et al., "Personalize Segment Anything Model with One Shot",
ICLR 2024) changes two things inside SAM's decoder, with its weights untouched:

* **target-guided attention**: in each two-way block's token-to-image cross-attention, the
  attention map (after its softmax) gets the location prior ``attn_sim`` added, and is
  normalised by a second softmax;
* **target-semantic prompting**: the target embedding (the reference object's mean feature) is
  added to the tokens before every two-way block and to the final token-to-image attention's
  queries. As in the official code, where the first addition happens in place on the prompt
  tokens, the positional encoding of the queries carries it too.

:class:`PersonalisedDecoder` runs Meta's ``MaskDecoder`` (and its ``TwoWayTransformer``) module by
module with those changes; with neither prior it equals the plain decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_sim: torch.Tensor | None = None) -> torch.Tensor:
    """Meta's ``Attention`` forward; with ``attn_sim`` (broadcast to (B, heads, Nq, Nk)) added
    to the softmaxed map and softmaxed again (PerSAM)."""
    q, k, v = attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)
    q, k, v = (attn._separate_heads(x, attn.num_heads) for x in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    if attn_sim is not None:
        a = torch.softmax(a + attn_sim, dim=-1)
    return attn.out_proj(attn._recombine_heads(a @ v))


def _block(block: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
           attn_sim: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's ``TwoWayAttentionBlock`` forward with the location prior in its token-to-image attention."""
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q=q, k=q, v=queries)
    queries = block.norm1(queries)
    queries = block.norm2(queries + _attention(block.cross_attn_token_to_image, queries + query_pe, keys + key_pe,
                                               keys, attn_sim))
    queries = block.norm3(queries + block.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = block.norm4(keys + block.cross_attn_image_to_token(q=k, k=q, v=queries))
    return queries, keys


class PersonalisedDecoder(nn.Module):
    """SAM's mask decoder with PerSAM's two priors (shares the decoder's weights, adds none).

    forward(image_embeddings (1, 256, 64, 64), image_pe (1, 256, 64, 64), sparse (N, T, 256),
    dense (N, 256, 64, 64), multimask_output, attn_sim (1, 1, 1, 4096) or None, target (1, 1, 256)
    or None) -> (N, C, 256, 256) mask logits, (N, C) predicted IoU; C = 3 or 1.
    """

    def __init__(self, mask_decoder: nn.Module):
        super().__init__()
        self.decoder = mask_decoder

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor, multimask_output: bool, attn_sim: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.decoder
        output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens[None].expand(sparse.shape[0], -1, -1), sparse), dim=1)
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0) + dense
        pos = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        t = d.transformer
        keys, key_pe = src.flatten(2).permute(0, 2, 1), pos.flatten(2).permute(0, 2, 1)
        query_pe = tokens if target is None else tokens + target  # the official in-place addition's effect
        queries = tokens
        for layer in t.layers:
            if target is not None:
                queries = queries + target
            queries, keys = _block(layer, queries, keys, query_pe, key_pe, attn_sim)
        q = queries + query_pe + (target if target is not None else 0)
        queries = t.norm_final_attn(queries + t.final_attn_token_to_image(q=q, k=keys + key_pe, v=keys))
        iou_token, mask_tokens = queries[:, 0], queries[:, 1 : 1 + d.num_mask_tokens]
        upscaled = d.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou = d.iou_prediction_head(iou_token)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou[:, sl]


def location_prior(similarity: torch.Tensor, size: int = 64) -> torch.Tensor:
    """PerSAM's attention prior from an (H, W) similarity map: standardised, resized to the
    embedding grid, squashed by a sigmoid; (1, 1, 1, size * size)."""
    s = (similarity - similarity.mean()) / similarity.std()
    s = F.interpolate(s[None, None], size=(size, size), mode="bilinear")
    return s.sigmoid()[None].flatten(3)
