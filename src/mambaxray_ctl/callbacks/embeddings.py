"""Image and text embeddings of a stage-2/3 module (its ``embed(batch) -> (image, text)``) over a
dataloader: used by :class:`~mambaxray_ctl.callbacks.tensorboard.EmbeddingProjector` at the end of
training and by the notebooks' :mod:`mambaxray_ctl.evaluation.qualitative` on a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from mambaxray_ctl.stages.reportgen import ReportGenModule


@torch.no_grad()
def collect_embeddings(
    module: ReportGenModule, dataloader: Iterable[Mapping[str, Any]], max_studies: int | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(ids, image, text)`` for up to ``max_studies`` studies, from :meth:`ReportGenModule.embed`:
    ``image`` = the mean mapped visual token, ``text`` = ``text_proj`` of the LM's mean frozen input
    embedding of the reference's target tokens — the two sides of the CTL-FT loss, L2-normalised,
    (N, hidden) float32.

    Target tokens are those of training (:meth:`ReportLM.build_inputs`: report ids + EOS, truncated
    to ``lm.max_target_tokens``, padding excluded unless the module's ``ctl_ft.include_padding``).
    """
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    ids: list[str] = []
    images: list[np.ndarray] = []
    texts: list[np.ndarray] = []
    try:
        for batch in dataloader:
            if max_studies is not None and len(ids) >= max_studies:
                break
            take = (
                len(batch["ids"]) if max_studies is None else min(len(batch["ids"]), max_studies - len(ids))
            )
            view_mask = batch.get("view_mask")
            image, text = module.embed(
                {
                    "images": batch["images"][:take].to(device),
                    "view_mask": None if view_mask is None else view_mask[:take].to(device),
                    "reports": list(batch["reports"][:take]),
                }
            )
            ids += [str(i) for i in batch["ids"][:take]]
            images.append(image.float().cpu().numpy())
            texts.append(text.float().cpu().numpy())
    finally:
        module.train(was_training)
    if not ids:
        raise ValueError("the dataloader gave no studies")
    return ids, np.concatenate(images), np.concatenate(texts)
