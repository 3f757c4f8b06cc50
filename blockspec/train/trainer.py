"""The training loop (SPEC section 6): random anchors per step, the block-masked forward, same-position
gamma-decayed loss, AdamW with fp32 master weights under bf16 autocast on CUDA, warmup + cosine, clipping.

Determinism and resume: the global batch of step s is a pure function of (seed, s) -- the epoch's shuffled
order comes from (seed, epoch), the anchors from (seed, s) -- so a run resumed from a checkpoint (weights,
optimizer, scheduler, RNG states, data position) draws exactly what an uninterrupted run would, and a K-GPU
run draws exactly what one GPU would at the same global batch (each rank keeps a slice of the rows; the loss
is normalised by the GLOBAL weight sum, so DDP's (or FSDP2's) gradient average equals the one-GPU gradient).

Checkpoints are written to a temporary file and moved into place with os.replace (atomic): a crash
leaves the previous checkpoint intact (the next start removes the temporary file). They hold the full
draft and optimizer state keyed by parameter name (gathered from the shards under FSDP2), so a run
resumes under any number of processes and either mode.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from blockspec import distributed
from blockspec.draft import (MASK_EMBEDDING, DraftConfig, DraftModel, load_draft, new_draft, new_draft_for_target,
                             save_draft)
from blockspec.errors import BlockspecError
from blockspec.files import atomic_write
from blockspec.target import Target
from blockspec.target.loading import DTYPES
from blockspec.train.data import SequenceDataset, collate, epoch_batches
from blockspec.train.forward import BlockTrainer
from blockspec.train.loss import (anchor_scores, block_labels, block_loss, block_metrics, cosine_with_warmup,
                                  default_gamma, sample_anchors)
from blockspec.train.metrics import MetricsLog, plot_metrics

CHECKPOINT = "checkpoint.pt"
DRAFT_DIR = "draft"
METRICS = "metrics.jsonl"
PLOT = "curves.png"
CHECKPOINT_KEYS = {"draft", "draft_config", "optimizer", "scheduler", "step", "data_position", "rng", "train_config",
                   "data_fingerprint"}
# settings a resumed run must share with the checkpoint (the others -- logging, eval, time budget -- may change)
RESUME_KEYS = ("arch", "num_layers", "block_size", "intermediate_size", "num_heads", "num_kv_heads",
               "target_layer_ids", "mask_token_id", "steps", "epochs", "batch_size", "num_anchors", "seq_len", "lr",
               "warmup_ratio", "weight_decay", "grad_clip", "gamma", "seed", "init_std", "pad_multiple", "attention",
               "sliding_window")


@dataclass
class TrainConfig:
    arch: str = "dflash"
    num_layers: int = 1
    block_size: int = 16
    intermediate_size: int | None = None  # default: the target's (a smaller one = a narrower draft)
    num_heads: int | None = None  # default: the target's; fewer heads = narrower attention
    num_kv_heads: int | None = None
    target_layer_ids: list[int] | None = None  # default: SPEC's rule for num_layers
    mask_token_id: int | None = None  # None: a learned mask embedding (works for any vocabulary)
    sliding_window: int | None = None  # every layer but the last slides over this many positions (Qwen3.5 drafts)
    steps: int | None = None  # default: epochs * batches per epoch
    epochs: float = 6.0
    batch_size: int = 16  # sequences per optimizer step, over all ranks
    num_anchors: int = 512
    seq_len: int = 3072
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gamma: float | None = None  # default: 7 / 5 / 4 for B = 16 / 10 / 8
    seed: int = 0
    init_std: float = 0.02
    pad_multiple: int = 64  # dense attention: batches are padded to a multiple of this (flex: to seq_len)
    attention: str = "auto"  # auto (flex on CUDA, dense elsewhere) | flex | dense
    features: str = "online"  # online | offline
    parallel: str = "auto"  # with several processes: ddp | fsdp | auto (fsdp when the training state is large)
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate tau only at the end (when eval prompts are given)
    eval_max_new_tokens: int = 128
    checkpoint_every: int = 0  # 0: only when the run stops
    loss_chunk_rows: int = 8192
    max_minutes: float | None = None  # stop (checkpoint saved, resumable) once this much time has passed
    stop_after_steps: int | None = None  # stop (checkpoint saved, resumable) after this many steps in total
    export_dtype: str = "bfloat16"
    progress: bool = True

    def resume_view(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in RESUME_KEYS}


@dataclass
class TrainResult:
    output_dir: Path
    draft_dir: Path
    steps_done: int
    total_steps: int
    finished: bool
    losses: list[float] = field(default_factory=list)  # one per step run by THIS call
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: float | None = None  # median wall time of a step (after the first few)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove_stale_temporaries(out: Path) -> None:
    """Half-written files that a killed run left in its output folder (ours are removed as we go)."""
    mine = f".tmp-{os.getpid()}"
    for path in [*out.glob(f"{CHECKPOINT}.tmp-*"), *out.glob(f".{DRAFT_DIR}.tmp-*")]:
        if path.name.endswith(mine):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise BlockspecError(f"--resume: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError or UnpicklingError for a cut-off file
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise BlockspecError(f"--resume: {path} is unreadable ({reason}); it was cut off or corrupted: delete it "
                             f"to start over") from None
    if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= checkpoint.keys():
        raise BlockspecError(f"--resume: {path} is not a blockspec training checkpoint")
    return checkpoint


def atomic_save_draft(draft: DraftModel, directory: Path, dtype: torch.dtype | None = None) -> None:
    """save_draft into a fresh temporary folder, then swapped into place (never a half-written draft)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = draft
    if dtype is not None:
        from blockspec.train.evaluate import serving_copy

        model = serving_copy(draft, dtype, torch.device("cpu"))
    save_draft(model, tmp)
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def build_draft(target: Target, cfg: TrainConfig) -> DraftModel:
    """A freshly initialised draft shaped for the target (hidden size = the target's, always)."""
    tc = target.model.config
    overrides: dict = {}
    for key in ("intermediate_size", "num_heads", "num_kv_heads", "target_layer_ids"):
        if getattr(cfg, key) is not None:
            overrides[key] = getattr(cfg, key)
    heads = overrides.get("num_heads", tc.num_heads)
    kv = overrides.get("num_kv_heads", min(tc.num_kv_heads, heads))
    if heads < 1 or kv < 1 or heads % kv:
        raise BlockspecError(f"draft heads: num_kv_heads ({kv}) must divide num_heads ({heads})")
    overrides["num_kv_heads"] = kv
    bad = [i for i in overrides.get("target_layer_ids") or [] if not 0 <= i < tc.num_layers]
    if bad:
        raise BlockspecError(f"target layer id {bad[0]} is out of range for a {tc.num_layers}-layer target")
    if cfg.arch not in ("dflash", "dflare"):
        raise BlockspecError(f"unknown draft architecture {cfg.arch!r}: use dflash or dflare")
    if cfg.block_size < 2:
        raise BlockspecError(f"block size must be at least 2, got {cfg.block_size}")
    if cfg.mask_token_id is not None and not 0 <= cfg.mask_token_id < tc.vocab_size:
        raise BlockspecError(f"mask token id {cfg.mask_token_id} is outside the target vocabulary "
                             f"(0..{tc.vocab_size - 1})")
    if cfg.sliding_window is not None:
        if cfg.sliding_window < 1 or cfg.num_layers < 2:
            raise BlockspecError(f"a sliding window needs a positive size ({cfg.sliding_window}) and at least 2 "
                                 f"draft layers ({cfg.num_layers}): the last layer keeps full attention")
        overrides.update(layer_types=["sliding_attention"] * (cfg.num_layers - 1) + ["full_attention"],
                         sliding_window=cfg.sliding_window, use_sliding_window=True)
    return new_draft_for_target(tc, arch=cfg.arch, num_layers=cfg.num_layers, block_size=cfg.block_size,
                                mask_token_id=cfg.mask_token_id, seed=cfg.seed, std=cfg.init_std, **overrides)


def count_parameters(draft: DraftModel) -> int:
    return sum(p.numel() for p in draft.parameters())


class Trainer:
    """Trains one draft for one target on one dataset; see `train()` for the one-call API."""

    def __init__(self, target: Target, dataset: SequenceDataset, cfg: TrainConfig, output_dir: str | Path,
                 eval_prompts: list[list[int]] | None = None, resume: bool = False,
                 init_from: str | Path | None = None, log: Callable[[str], None] | None = None) -> None:
        self.target = target
        self.dataset = dataset
        self.cfg = cfg
        self.out = Path(output_dir)
        self.eval_prompts = eval_prompts or []
        self.device = target.device
        # under torchrun, join the process group here if the caller has not (the CLI already has)
        self.dist = distributed.current() if distributed.current().enabled \
            else distributed.init_from_env(str(self.device))[0]
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not self.dist.main:
            self.log = lambda msg: None
        if cfg.batch_size % self.dist.world:
            raise BlockspecError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes "
                                 f"({self.dist.world})")
        if len(dataset) < cfg.batch_size:
            raise BlockspecError(f"the dataset has {len(dataset)} sequences, fewer than one batch ({cfg.batch_size})")
        for p in target.model.parameters():
            p.requires_grad_(False)

        if self.dist.main and self.out.is_dir():
            remove_stale_temporaries(self.out)
        checkpoint = None
        if resume:
            checkpoint = load_checkpoint(self.out / CHECKPOINT)
            saved = checkpoint["train_config"]
            now = cfg.resume_view()
            diff = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
            if diff:
                raise BlockspecError(f"--resume: setting {diff[0]!r} was {saved.get(diff[0])!r} in the checkpoint "
                                     f"but is {now.get(diff[0])!r} now; resume with the same settings")
            if checkpoint["data_fingerprint"] != dataset.fingerprint():
                raise BlockspecError("--resume: the training data differs from the checkpoint's (different sources "
                                     "or generation settings)")
            self.draft = self._draft_from_config(checkpoint["draft_config"], checkpoint["draft"])
        elif init_from is not None:
            self.draft = load_draft(init_from, device="cpu", dtype=torch.float32)
            if self.draft.config.kind != cfg.arch:
                raise BlockspecError(f"--init-from draft is {self.draft.config.kind}, but --arch is {cfg.arch}")
        else:
            self.draft = build_draft(target, cfg)
        from blockspec.draft import check_draft_fits_target

        check_draft_fits_target(self.draft, target.model.config, "training draft")
        self.draft = self.draft.to(self.device).float().train()
        self.block_size = self.draft.block_size
        self.gamma = cfg.gamma or default_gamma(self.block_size)
        self.tap_ids = tuple(self.draft.config.target_layer_ids)

        attention = cfg.attention
        if attention == "auto":
            attention = "flex" if self.device.type == "cuda" else "dense"
        if attention not in ("flex", "dense"):
            raise BlockspecError(f"unknown attention {cfg.attention!r}: use auto, flex or dense")
        self.attention = attention
        self.module = BlockTrainer(self.draft, attention, compiled_flex=self.device.type == "cuda")
        self.batches_per_epoch = len(dataset) // cfg.batch_size
        self.total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * self.batches_per_epoch))
        self.start_step = int(checkpoint["step"]) if checkpoint is not None else 0
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self.features = self._make_features(target, dataset)
        if self.attention == "flex":
            # before DDP/FSDP wrap the draft: the probe must run no collectives of theirs
            self._agree_on_attention(self.make_batch(self.start_step))

        self.parallel = self._choose_parallel()
        self.model = self.module
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        elif self.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # one group over the whole draft: its parameters are gathered for the step, while gradients,
            # fp32 master weights and AdamW moments stay sharded (the part that does not fit)
            fully_shard(self.module)

        params = [p for p in self.draft.parameters() if p.requires_grad]
        fused = {"fused": True} if self.device.type == "cuda" and self.parallel != "fsdp" else {}
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                           **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           cosine_with_warmup(self.total_steps, cfg.warmup_ratio))
        if checkpoint is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.module, self.optimizer, checkpoint["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            _set_rng_state(checkpoint["rng"])
            epoch, index = divmod(self.start_step, self.batches_per_epoch)
            if checkpoint["data_position"] != {"epoch": epoch, "batch": index}:
                raise BlockspecError("--resume: the checkpoint's data position does not match its step")
            self.log(f"resumed from {self.out / CHECKPOINT} at step {self.start_step}")

    def _make_features(self, target, dataset: SequenceDataset):
        if self.cfg.features == "offline":
            from blockspec.train.features import OfflineFeatures

            if not self.dist.main:
                distributed.barrier()  # rank 0 computes the feature file first; the others then map it
            # batches as large as a training step's: the online path runs that shape every step
            features = OfflineFeatures(target.model, self.tap_ids, dataset, self.out / "features",
                                       batch_size=self.cfg.batch_size, log=self.log)
            if self.dist.main:
                distributed.barrier()
            return features
        if self.cfg.features == "online":
            from blockspec.train.features import OnlineFeatures

            return OnlineFeatures(target.model, self.tap_ids)
        raise BlockspecError(f"unknown features mode {self.cfg.features!r}: use online or offline")

    def _choose_parallel(self) -> str:
        """none for one process; else DDP (a full copy of the training state per GPU), or FSDP2 when asked or
        when that state -- fp32 weights, gradients and two AdamW moments, 16 bytes a parameter -- would take
        more than a quarter of a GPU."""
        if not self.dist.enabled:
            return "none"
        choice = self.cfg.parallel
        if choice not in ("auto", "ddp", "fsdp"):
            raise BlockspecError(f"unknown --parallel {choice!r}: use auto, ddp or fsdp")
        if choice == "auto":
            state_bytes = 16 * count_parameters(self.draft)
            big = self.device.type == "cuda" and state_bytes > torch.cuda.get_device_properties(
                self.device).total_memory / 4
            choice = "fsdp" if big else "ddp"
        self.log(f"{self.dist.world} processes: {choice.upper()}")
        return choice

    def _draft_from_config(self, raw: dict, state: dict) -> DraftModel:
        draft = new_draft(DraftConfig.from_dict(raw, "checkpoint"), mask_embedding=MASK_EMBEDDING in state)
        draft.load_state_dict(state, assign=True)
        return draft

    # ---- batches ---------------------------------------------------------------------------------------------
    def data_position(self, step: int) -> dict:
        epoch, index = divmod(step, self.batches_per_epoch)
        return {"epoch": epoch, "batch": index}

    def global_batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.batches_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = epoch_batches(self.dataset.lengths, self.cfg.batch_size, self.cfg.seed, epoch,
                                    bucket=self.attention == "dense")
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1][index]

    def make_batch(self, step: int) -> dict:
        """This rank's rows of the global batch of `step`, padded, with their anchors."""
        cfg = self.cfg
        indices = self.global_batch(step)
        lengths_all = self.dataset.lengths[indices].clamp(max=cfg.seq_len)
        if self.attention == "flex":
            pad_to = cfg.seq_len  # one shape: the compiled kernel is built once
        else:
            longest = int(lengths_all.max())
            pad_to = min(cfg.seq_len, -(-longest // cfg.pad_multiple) * cfg.pad_multiple)
        ids, mask, lengths = collate(self.dataset, indices, pad_to)
        scores = anchor_scores(cfg.seed, step, len(indices), cfg.seq_len)
        anchors, valid = sample_anchors(scores, mask, lengths, cfg.num_anchors, self.block_size)
        per = len(indices) // self.dist.world
        rows = slice(self.dist.rank * per, (self.dist.rank + 1) * per)
        dev = self.device
        return {"indices": indices[rows], "input_ids": ids[rows].to(dev), "loss_mask": mask[rows].to(dev),
                "lengths": lengths[rows], "anchors": anchors[rows].to(dev), "valid": valid[rows].to(dev),
                "global_tokens": int(lengths.sum())}

    # ---- one step --------------------------------------------------------------------------------------------
    def _autocast(self):
        return (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def _agree_on_attention(self, batch: dict) -> None:
        """flex_attention compiles on first use and can fail there (no backward on the CPU, an unsupported GPU).
        Every process tries one forward/backward of its first batch before DDP/FSDP (no collectives), and all of
        them fall back to dense attention (the same mask, materialised) if any failed: processes running
        different attention would compute different shapes and hang DDP."""
        error = None
        try:
            features = self.features(batch["input_ids"], indices=batch["indices"], lengths=batch["lengths"])
            with self._autocast():
                hidden = self.module(features, batch["input_ids"], batch["anchors"],
                                     self.target.model.embed_tokens.weight)
            hidden.float().sum().backward()
        except Exception as exc:  # any compile or launch failure means: not on this machine
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        self.draft.zero_grad(set_to_none=True)
        failed = int(distributed.all_reduce_sum(torch.tensor([float(error is not None)], device=self.device)).item())
        if failed:
            self.log(f"warning: flex_attention failed in {failed} of {self.dist.world} process(es) "
                     f"({error or 'on another rank'}); all fall back to dense attention")
            self.attention = self.module.attention = "dense"
            self._epoch_cache = None  # dense attention buckets the batches by length

    def _forward_backward(self, batch: dict) -> dict:
        target = self.target.model
        features = self.features(batch["input_ids"], indices=batch["indices"], lengths=batch["lengths"])
        with self._autocast():
            hidden = self.model(features, batch["input_ids"], batch["anchors"], target.embed_tokens.weight)
            labels, weights = block_labels(batch["input_ids"], batch["loss_mask"], batch["anchors"], batch["valid"],
                                           self.block_size, self.gamma)
            loss_sum, correct = block_loss(hidden, target.lm_head.weight, labels, weights, self.cfg.loss_chunk_rows)
        weight_sum = distributed.all_reduce_sum(weights.sum().detach().clone())
        # DDP and FSDP average gradients over ranks: scale so the result is the gradient of sum(CE*w) / global sum(w)
        loss = loss_sum / weight_sum.clamp_min(1e-12) * self.dist.world
        loss.backward()
        sums = block_metrics(correct, weights)
        sums["loss_sum"] = loss_sum.detach().float()
        sums["weight_sum"] = weight_sum
        return sums

    def train_step(self, step: int) -> dict:
        batch = self.make_batch(step)
        sums = self._forward_backward(batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the shards
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for key in ("loss_sum", "correct_k", "count_k", "accept_sum", "accept_blocks"):
            distributed.all_reduce_sum(sums[key])
        acc_k = (sums["correct_k"][1:] / sums["count_k"][1:].clamp_min(1)).tolist()
        return {"step": step + 1, "loss": float(sums["loss_sum"] / sums["weight_sum"].clamp_min(1e-12)),
                "acc": float(sums["correct_k"][1:].sum() / sums["count_k"][1:].sum().clamp_min(1)),
                "acc_k": [round(a, 4) for a in acc_k],
                "accept_len": float(sums["accept_sum"] / sums["accept_blocks"].clamp_min(1)),
                "lr": lr, "grad_norm": float(grad_norm), "epoch": step / self.batches_per_epoch,
                "tokens": batch["global_tokens"],  # all ranks' rows: each rank collates the whole batch
                "blocks": int(sums["count_k"][1].item())}

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def _full_state(self, optimizer: bool) -> tuple[dict, dict | None]:
        """The draft's full weights (and optimizer state, keyed by parameter name so that a checkpoint resumes
        under any parallel mode), on the CPU, in rank 0. Under FSDP every rank must call this: it gathers."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.module, options=options)
        weights = {k.removeprefix("draft."): v.detach().cpu() for k, v in weights.items()}
        optim = get_optimizer_state_dict(self.module, self.optimizer, options=options) if optimizer else None
        return weights, optim

    def _full_draft(self) -> DraftModel | None:
        """The draft as a plain module in rank 0 (itself, or under FSDP a gathered copy); None elsewhere."""
        if self.parallel != "fsdp":
            return self.draft if self.dist.main else None
        weights, _ = self._full_state(optimizer=False)
        if not self.dist.main:
            return None
        return self._draft_from_config(self.draft.config.to_dict(), weights).to(self.device).eval()

    def save_checkpoint(self, next_step: int) -> None:
        weights, optim = self._full_state(optimizer=True)
        if not self.dist.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            "draft": weights,
            "draft_config": self.draft.config.to_dict(),
            "optimizer": optim,
            "scheduler": self.scheduler.state_dict(),
            "step": next_step,
            "data_position": self.data_position(next_step),
            "rng": _rng_state(),
            "train_config": self.cfg.resume_view(),
            "data_fingerprint": self.dataset.fingerprint(),
            "world_size": self.dist.world,
        }
        atomic_write(self.out / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    def export(self) -> Path:
        directory = self.out / DRAFT_DIR
        draft = self._full_draft()
        if draft is not None:
            atomic_save_draft(draft, directory, DTYPES[self.cfg.export_dtype])
        return directory

    def evaluate(self, step: int, metrics: MetricsLog) -> dict | None:
        if not self.eval_prompts:
            return None
        draft = self._full_draft()
        if draft is None:
            return None
        from blockspec.train.evaluate import evaluate_draft

        result = evaluate_draft(self.target, draft, self.eval_prompts, self.cfg.eval_max_new_tokens)
        record = {"step": step, "eval_tau": result["tau"], "eval_histogram": result["histogram"],
                  "eval_seconds": result["seconds"], "eval_prompts": len(self.eval_prompts)}
        metrics.write(record)
        self.log(f"step {step}: tau {result['tau']:.3f} on {len(self.eval_prompts)} held-out prompts")
        return record

    # ---- the loop --------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(self.out / METRICS, resume_step=self.start_step if self.start_step else None,
                             enabled=self.dist.main)
        if self.start_step == 0 and self.dist.main:
            metrics.write({"event": "start", "params": count_parameters(self.draft), "total_steps": self.total_steps,
                           "batches_per_epoch": self.batches_per_epoch, "sequences": len(self.dataset),
                           "attention": self.attention, "world_size": self.dist.world, "gamma": self.gamma,
                           "draft_config": self.draft.config.to_dict(), "step": 0})
        started = time.perf_counter()
        bar = None
        if cfg.progress and self.dist.main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.start_step, desc=f"train {self.draft.config.kind}",
                       unit="step", mininterval=2, file=sys.stderr)
        losses, evals, times = [], [], []
        step = self.start_step
        finished = False
        window_tokens, window_start = 0, time.perf_counter()
        while True:
            if step >= self.total_steps:
                finished = True
                break
            stop = cfg.stop_after_steps is not None and step >= cfg.stop_after_steps
            if cfg.max_minutes is not None:
                stop = stop or (time.perf_counter() - started) > cfg.max_minutes * 60
            if distributed.broadcast_flag(stop, self.device):
                break
            t0 = time.perf_counter()
            record = self.train_step(step)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            step += 1
            losses.append(record["loss"])
            window_tokens += record["tokens"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                                accept=f"{record['accept_len']:.2f}")
            if step % cfg.log_every == 0 or step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                record["tokens_per_s"] = round(window_tokens / elapsed, 1)
                record["elapsed_s"] = round(time.perf_counter() - started, 2)
                record["step_s"] = round(times[-1], 4)
                metrics.write(record)
                window_tokens, window_start = 0, time.perf_counter()
                if bar is None:
                    self.log(f"step {step}/{self.total_steps} loss {record['loss']:.4f} acc {record['acc']:.3f} "
                             f"accept {record['accept_len']:.2f} lr {record['lr']:.2e}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < self.total_steps:
                self.save_checkpoint(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                rec = self.evaluate(step, metrics)
                if rec:
                    evals.append(rec)
                distributed.barrier()
        if bar is not None:
            bar.close()
        self.save_checkpoint(step)
        draft_dir = self.export()
        if finished:
            rec = self.evaluate(step, metrics)
            if rec:
                evals.append(rec)
        if self.dist.main:
            plot_metrics(self.out / METRICS, self.out / PLOT, f"{self.draft.config.kind} draft")
        distributed.barrier()
        steady = sorted(times[3:]) if len(times) > 6 else sorted(times)
        return TrainResult(self.out, draft_dir, step, self.total_steps, finished, losses, evals,
                           time.perf_counter() - started, steady[len(steady) // 2] if steady else None)


def train(target: Target, dataset: SequenceDataset, cfg: TrainConfig, output_dir: str | Path,
          eval_prompts: list[list[int]] | None = None, resume: bool = False, init_from: str | Path | None = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train a draft for `target` on `dataset` into `output_dir` (checkpoint.pt, draft/, metrics.jsonl,
    curves.png). `resume` continues from output_dir/checkpoint.pt; `init_from` warm-starts from a draft."""
    return Trainer(target, dataset, cfg, output_dir, eval_prompts, resume, init_from, log).run()
