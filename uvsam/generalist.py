"""When the generalist may redraw a village: verified weights, then a confident, consistent mask.

UV-SAM's generalist draws a village's final boundary, but only a generalist with its official
weights knows what a boundary is. A random one (tests, demos, models trained offline) or one
whose weights file no registry digest vouches for draws noise, and a confident-looking empty
mask would delete the village. So refinement is guarded twice:

1. :func:`generalist_status`: a model refines only when its generalist's weights are the
   official ones (SHA-256 equal to the registry's or the user's pinned digest), unless forced;
2. :func:`judge`: per village, the generalist's mask replaces the specialist's outline only
   when it is confident (SAM's predicted IoU and stability score, the thresholds of SAM's own
   automatic mask generator) and consistent with the candidate (their IoU); otherwise the
   specialist's outline stays and the reason is recorded.

Refinement therefore never deletes a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uvsam import weights
from uvsam.config import RefineRule
from uvsam.modeling.registry import get_spec

# Reasons recorded per village (the ``refine_reason`` column).
REFINED = "refined"
OFF = "refinement off"
UNVERIFIED = "generalist not verified"
SMALL = "smaller than the generalist's minimum"
EMPTY = "generalist mask empty"
LOW_IOU = "low predicted IoU"
UNSTABLE = "unstable mask"
INCONSISTENT = "mask disagrees with candidate"


def stability_score(logits: np.ndarray, offset: float = 1.0) -> float:
    """SAM's stability score of one mask: IoU of the masks thresholded at +offset and -offset
    of its logits (1.0 for an empty mask at both, as there is nothing to be unstable)."""
    high = int((logits > offset).sum())
    low = int((logits > -offset).sum())
    return 1.0 if low == 0 else high / low


@dataclass(frozen=True)
class GeneralistStatus:
    """Whether a model's generalist has verified official weights, and why not."""

    verified: bool
    note: str


def generalist_status(meta: dict, encoder: str) -> GeneralistStatus:
    """Verified when the generalist came from a weights file whose SHA-256 is the registry's
    published digest for ``encoder`` or a digest the user pinned (``uvsam weights``)."""
    gen = meta.get("generalist") or {}
    if gen.get("source") == "random" or not gen.get("sha256"):
        return GeneralistStatus(False, f"the {encoder} generalist has random weights (trained without --checkpoint)")
    expected = weights.expected_sha256(get_spec(encoder))
    if expected is None:
        return GeneralistStatus(False, f"no official SHA-256 is known for {encoder} weights (pin the digest you trust "
                                       f"with `uvsam weights import {encoder} FILE --sha256 ...`)")
    if gen["sha256"] != expected:
        return GeneralistStatus(False, f"the {encoder} weights it was trained with (SHA-256 {gen['sha256'][:12]}...) "
                                       f"are not the official ones ({expected[:12]}...)")
    return GeneralistStatus(True, f"official {encoder} weights (SHA-256 {expected[:12]}...)")


def judge(rule: RefineRule, overlap: float, predicted_iou: float | None, stability: float | None,
          empty: bool) -> tuple[bool, str]:
    """(accept, reason) for one candidate's generalist mask."""
    if empty:
        return False, EMPTY
    if predicted_iou is not None and predicted_iou < rule.min_predicted_iou:
        return False, LOW_IOU
    if stability is not None and stability < rule.min_stability:
        return False, UNSTABLE
    if overlap < rule.min_overlap:
        return False, INCONSISTENT
    return True, REFINED
