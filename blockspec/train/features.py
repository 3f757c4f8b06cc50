"""Target features for training: online (a frozen target forward every step) or offline (computed once per
run as a flat array [total tokens, T*H]: in GPU memory when it fits, else a memory-mapped file on disk).

Online costs one target forward per step (a padded batch through every target layer: for a small target
that is a large share of the step) and no memory; offline costs T*H values per token (3 taps of a 576-wide
target are ~3.5 KB/token in bf16) and one forward over the data, and then skips the target entirely.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from blockspec.files import atomic_write
from blockspec.target import TargetModel
from blockspec.train.data import SequenceDataset, collate, weights_fingerprint

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
    """Features of every dataset sequence, computed once per run. Kept in device memory when they fit in
    `resident_fraction` of what is free (on a GPU: a gather per batch, no host traffic), otherwise written once
    to `<dir>/features-<key>.npy` and memory-mapped. `resident` forces either choice."""

    def __init__(self, model: TargetModel, tap_ids: tuple[int, ...], dataset: SequenceDataset, directory: str | Path,
                 batch_size: int = 16, resident: bool | None = None, resident_fraction: float = 0.4,
                 log: Callable[[str], None] = print) -> None:
        self.dataset = dataset
        self.dtype = model.embed_tokens.weight.dtype
        self.device = model.embed_tokens.weight.device
        width = len(tap_ids) * model.config.hidden_size
        total = int(dataset.offsets[-1])
        size = total * width * self.dtype.itemsize
        if resident is None:
            resident = self.device.type == "cuda" and size < resident_fraction * torch.cuda.mem_get_info(self.device)[0]
            if self.device.type == "cuda" and not resident:
                log(f"features: {size / 2**30:.1f} GiB exceed {resident_fraction:.0%} of the free GPU memory; "
                    f"memory-mapped from disk instead (each step copies its batch from the host)")
        self.resident: torch.Tensor | None = None
        if resident:
            self.resident = torch.empty(total, width, dtype=self.dtype, device=self.device)
            for start, values in self._compute(model, tap_ids, batch_size):
                self.resident[start:start + values.shape[0]] = values
            self._offsets = dataset.offsets.to(self.device)
            log(f"features: {total} tokens x {width} kept in {self.device} memory ({size / 2**30:.1f} GiB)")
            return
        key = hashlib.sha256(json.dumps({"data": dataset.fingerprint(), "taps": list(tap_ids),
                                         "target": repr(model.config), "dtype": str(self.dtype),
                                         "weights": weights_fingerprint(model)}).encode())
        path = Path(directory) / f"features-{key.hexdigest()[:16]}.npy"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)

            def write(tmp: Path) -> None:
                store = np.lib.format.open_memmap(tmp, mode="w+", dtype=_NUMPY[self.dtype], shape=(total, width))
                for start, values in self._compute(model, tap_ids, batch_size):
                    store[start:start + values.shape[0]] = self._to_numpy(values.cpu())
                store.flush()

            atomic_write(path, write)
            log(f"features: {total} tokens x {width} cached to {path}")
        self.store = np.load(path, mmap_mode="r")

    def _to_numpy(self, t: torch.Tensor) -> np.ndarray:
        if self.dtype == torch.bfloat16:  # numpy has no bfloat16: the bits, as uint16
            return t.contiguous().view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    def _compute(self, model: TargetModel, tap_ids: tuple[int, ...], batch_size: int):
        """(flat start, features [n, T*H]) of every sequence, through the target once in batches of similar
        length, longest first (so the cache is allocated once)."""
        dataset = self.dataset
        online = OnlineFeatures(model, tap_ids)
        order = sorted(range(len(dataset)), key=lambda i: -int(dataset.lengths[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, _, lengths = collate(dataset, rows, int(dataset.lengths[rows].max()))
            feats = online(ids.to(self.device))
            for r, i in enumerate(rows):
                yield int(dataset.offsets[i]), feats[r, :int(lengths[r])]

    def __call__(self, input_ids: torch.Tensor, indices: list[int], lengths: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        if self.resident is not None:
            rows = torch.as_tensor(indices, device=self.device)
            steps = torch.arange(s, device=self.device)
            valid = steps[None] < lengths.to(self.device)[:, None]
            flat = torch.where(valid, self._offsets[rows][:, None] + steps[None], 0)
            return self.resident[flat] * valid[..., None].to(self.dtype)
        out = torch.zeros(b, s, self.store.shape[1], dtype=self.dtype)
        for r, i in enumerate(indices):
            a = int(self.dataset.offsets[i])
            n = int(lengths[r])
            chunk = torch.from_numpy(np.array(self.store[a:a + n]))
            out[r, :n] = chunk.view(torch.bfloat16) if self.dtype == torch.bfloat16 else chunk
        return out.to(self.device, non_blocking=True)
