"""Target features for training: online (a frozen target forward every step) or offline (computed once,
stored on disk as a flat memory-mapped array [total tokens, T*H], read back per batch).

Online costs one target forward per step and no disk; offline trades disk (T*H values per token: 5 taps of
a 576-wide target are ~5.8 KB/token in bf16) for skipping that forward on every epoch after the first.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from blockspec.target import TargetModel
from blockspec.train.data import SequenceDataset, collate

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class OnlineFeatures:
    """Tapped target features of a padded batch, computed under no_grad with a reused static cache."""

    def __init__(self, model: TargetModel, tap_ids: tuple[int, ...]) -> None:
        self.model = model
        self.tap_ids = tuple(tap_ids)
        self._cache = None
        self._shape = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        b, s = input_ids.shape
        if self._shape is None or self._shape[0] != b or self._shape[1] < s:
            self._cache = None  # free first
            self._cache = self.model.new_cache(b, s)
            self._shape = (b, s)
        positions = torch.arange(s, device=input_ids.device)[None].expand(b, s)
        _, features = self.model(input_ids, positions, self._cache, self.tap_ids, kv_len=s)
        return features


class OfflineFeatures:
    """Features of every dataset sequence, computed once into `<dir>/features-<key>.npy` (memory-mapped)."""

    def __init__(self, model: TargetModel, tap_ids: tuple[int, ...], dataset: SequenceDataset, directory: str | Path,
                 batch_size: int = 16, log=print) -> None:
        self.dataset = dataset
        self.dtype = model.embed_tokens.weight.dtype
        self.device = model.embed_tokens.weight.device
        width = len(tap_ids) * model.config.hidden_size
        key = hashlib.sha256(json.dumps({"data": dataset.fingerprint(), "taps": list(tap_ids),
                                         "target": repr(model.config), "dtype": str(self.dtype),
                                         "probe": float(model.embed_tokens.weight.detach().float().sum())}).encode())
        path = Path(directory) / f"features-{key.hexdigest()[:16]}.npy"
        total = int(dataset.offsets[-1])
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            store = np.lib.format.open_memmap(tmp, mode="w+", dtype=_NUMPY[self.dtype], shape=(total, width))
            online = OnlineFeatures(model, tap_ids)
            order = sorted(range(len(dataset)), key=lambda i: int(dataset.lengths[i]))
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                s = int(dataset.lengths[rows].max())
                ids, _, lengths = collate(dataset, rows, s)
                feats = online(ids.to(self.device)).cpu()
                for r, i in enumerate(rows):
                    a = int(dataset.offsets[i])
                    n = int(lengths[r])
                    store[a:a + n] = self._to_numpy(feats[r, :n])
            store.flush()
            del store
            os.replace(tmp, path)
            log(f"features: {total} tokens x {width} cached to {path}")
        self.store = np.load(path, mmap_mode="r")

    def _to_numpy(self, t: torch.Tensor) -> np.ndarray:
        if self.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    def __call__(self, input_ids: torch.Tensor, indices: list[int], lengths: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        out = torch.zeros(b, s, self.store.shape[1], dtype=self.dtype)
        for r, i in enumerate(indices):
            a = int(self.dataset.offsets[i])
            n = int(lengths[r])
            chunk = torch.from_numpy(np.array(self.store[a:a + n]))
            out[r, :n] = chunk.view(torch.bfloat16) if self.dtype == torch.bfloat16 else chunk
        return out.to(self.device, non_blocking=True)
