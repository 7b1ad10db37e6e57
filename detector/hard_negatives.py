"""Hard-negative mining: after each training epoch, find where the model fires on normal structure.

A scan-level false alarm is the hottest of ~6,000 heatmap cells, so random negative crops rarely show
the network the few structures that fool it (wheel hubs, engine blocks, dense machinery). Each epoch
the miner runs the current model on a rotating share of the training scans, keeps the hottest cells
away from any labelled anomaly, and writes them to a JSON file that the crop workers (separate
processes) re-read (RUN/hard_negatives.json); CropDataset then centres part of its negative crops on them.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from detector.hard_types import write_atomic
from detector.model import nhwc
from detector.preprocess import normalize, pad_to_multiple, valid_cells


def hottest_cells(logits: np.ndarray, exclude: np.ndarray | None, k: int, min_logit: float) -> list[tuple[int, int]]:
    """Up to k local maxima (3x3) of a (h, w) logit map above min_logit, outside `exclude`, hottest first."""
    z = torch.from_numpy(np.ascontiguousarray(logits, np.float32))[None, None]
    peak = (z == F.max_pool2d(z, 3, 1, 1))[0, 0].numpy()
    cand = peak & (logits > min_logit)
    if exclude is not None:
        cand &= ~exclude
    ys, xs = np.nonzero(cand)
    order = np.argsort(-logits[ys, xs])[:k]
    return [(int(ys[i]), int(xs[i])) for i in order]


class HardNegativeMiner(L.Callback):
    """Every epoch: mine `share` of the training scans (rotating) and rewrite the hard-negative file.
    Under DDP each rank mines its slice of the scans and the ranks exchange what they found."""

    def __init__(self, share: float = 0.25, per_scan: int = 8, min_prob: float = 0.05) -> None:
        self.share, self.per_scan = share, per_scan
        self.min_logit = float(np.log(min_prob / (1 - min_prob)))
        self.found: dict[str, list[tuple[int, int]]] = {}
        self._offset = 0

    def state_dict(self) -> dict:
        """The cells found and the place in the rotation ride in the checkpoint: a resumed run keeps them,
        instead of shrinking the file to one epoch's share and mining the first scans again."""
        return {"found": {k: [list(c) for c in v] for k, v in self.found.items()}, "offset": self._offset}

    def load_state_dict(self, state: dict) -> None:
        self.found = {str(k): [(int(y), int(x)) for y, x in v] for k, v in state.get("found", {}).items()}
        self._offset = int(state.get("offset", 0))

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or dm.hard_negative_file is None or self.share <= 0:
            return
        metas, pre = dm.metas["train"], dm.pre
        n = max(1, int(round(len(metas) * self.share)))
        todo = [(self._offset + j) % len(metas) for j in range(min(n, len(metas)))]
        self._offset = (self._offset + n) % len(metas)
        todo = todo[trainer.global_rank::trainer.world_size]
        found: dict[str, list[tuple[int, int]]] = {}
        model, s = module.model, module.model.stride
        was_training = model.training
        model.eval()
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else None
        with torch.no_grad(), torch.autocast(module.device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
            for i in todo:
                att, mask = dm.cache.load(metas[i])
                x = pad_to_multiple(normalize(np.asarray(att), pre), pre.pad_multiple)
                z = model.logits(nhwc(torch.from_numpy(x)[None].to(module.device)))[0, 0].float().cpu().numpy()
                h, w = valid_cells(att.shape[1], att.shape[2], s)
                z = z[:h, :w]
                exclude = None
                if mask is not None and np.any(mask):
                    m = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
                    cells = F.max_pool2d(m, s, ceil_mode=True)
                    exclude = (F.max_pool2d(cells, 5, 1, 2)[0, 0].numpy() > 0)[:h, :w]
                cells = hottest_cells(z, exclude, self.per_scan, self.min_logit)
                found[metas[i]["key"]] = [(y * s + s // 2, x * s + s // 2) for y, x in cells]
        model.train(was_training)
        if trainer.world_size > 1:
            import torch.distributed as dist
            parts: list = [None] * trainer.world_size
            dist.all_gather_object(parts, found)
            found = {k: v for part in parts for k, v in part.items()}
        self.found.update(found)
        if trainer.is_global_zero:   # the crop workers of every rank read this one file
            write_atomic(dm.hard_negative_file, {k: v for k, v in self.found.items() if v})
        hot = sum(len(v) for v in self.found.values())
        module.log("train/hard_negatives", float(hot), on_epoch=True, on_step=False, sync_dist=True)
