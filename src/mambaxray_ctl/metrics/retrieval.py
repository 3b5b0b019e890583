"""Image↔report retrieval recall@K over the gathered, de-duplicated validation split (stage 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from mambaxray_ctl.metrics.report import add_text_state, decode_texts, deduplicate, encode_texts


def recall_at_k(similarity: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall@k of the diagonal pairing for rows→columns of a square similarity matrix."""
    correct = similarity.diagonal().unsqueeze(1)
    rank = (similarity > correct).sum(dim=1)  # 0 = the true pair scores highest
    return {f"R@{k}": (rank < k).float().mean().item() for k in ks}


class RetrievalRecall(Metric):
    """Image→text and text→image recall@K of paired embeddings, one pair per study id.

    Embeddings are gathered from all ranks; the duplicates DistributedSampler pads with are removed
    by id before scoring. ``compute`` returns ``{"i2t_R@1": ..., "t2i_R@1": ..., ...}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (1, 5, 10)) -> None:
        super().__init__()
        self.ks = tuple(ks)
        self.add_state("image", default=[], dist_reduce_fx="cat")
        self.add_state("text", default=[], dist_reduce_fx="cat")
        add_text_state(self, "ids")

    def update(self, ids: Sequence[str], image: Tensor, text: Tensor) -> None:
        self.image.append(F.normalize(image.detach().float(), dim=-1))
        self.text.append(F.normalize(text.detach().float(), dim=-1))
        self.ids.append(encode_texts(ids, image.device, "ids"))

    def embeddings(self) -> tuple[list[str], Tensor, Tensor]:
        """The de-duplicated ``(ids, image, text)`` of the whole (gathered) split."""
        image, text = _cat(self.image), _cat(self.text)
        ids = decode_texts(self.ids)
        keep = deduplicate(ids, [None] * len(ids), what="embedding").keep
        index = torch.tensor(keep, dtype=torch.long, device=image.device)
        return [ids[i] for i in keep], image[index], text[index]

    def compute(self) -> dict[str, float]:
        _, image, text = self.embeddings()
        if image.shape[0] == 0:
            raise ValueError("RetrievalRecall: no embeddings were recorded")
        similarity = image @ text.T
        out = {f"i2t_{k}": v for k, v in recall_at_k(similarity, self.ks).items()}
        out |= {f"t2i_{k}": v for k, v in recall_at_k(similarity.T, self.ks).items()}
        return out


def _cat(state: Tensor | list[Tensor]) -> Tensor:
    return torch.cat(state) if isinstance(state, list) else state
