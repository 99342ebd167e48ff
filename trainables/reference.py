"""The DPO/CITA reference log-probs, computed once per model, precision and training set and shared by every trial
that trains on them (on one machine), instead of a reference forward in every training step.

The reference is the base model (the adapter disabled), so its log-probs of a training pair depend on the model's
weights, the precision and the pair's tokens, not on the trial's seed, learning rate, adapter or method: a
multi-seed sweep's DPO and CITA trials of one precision all read the same values. TRL's own
`precompute_ref_log_probs` caches them too, but keys the cache by a hash of the whole model with its fresh adapter
(a different key for every seed; on an 8B model its trainer took 87.5 s to build against 13.3 s with this cache's
miss, most of it likely that hash) and runs the pass over the whole training set in every trial. This module keys
them by what they depend on and computes them with TRL's own `compute_ref_log_probs`, at the trial's micro-batch.

Measured (BENCHMARKS.md, 2026-11-24): the reference pass is 18-29% of an 8B DPO step (27% of the planned one). The
values differ from the in-step ones only by the rounding of another batch composition (bf16), as any micro-batch change.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid

import torch

from trainables import models
from trainables.models import cache_root, file_lock

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def cache_key(trainer, cfg) -> str:
    """What the reference log-probs of the trainer's (tokenized) training set depend on: the weights, the precision,
    the pairs' tokens (template, tokenizer and prompt truncation are in them), how TRL's collator and
    reference pass treat them (truncation to max_length, ld_alpha's weighting) and the layers' kernels (Liger's)."""
    import trl
    import transformers

    model = trainer.accelerator.unwrap_model(trainer.model)
    parts = [cfg.model, getattr(model.config, "_commit_hash", None), models.weight_files(cfg.model), cfg.precision,
             tokens_hash(trainer.train_dataset), trainer.args.max_length, trainer.args.truncation_mode,
             trainer.args.ld_alpha, trl.__version__, transformers.__version__, torch.__version__,
             str(trainer.accelerator.device.type)]
    if trainer.args.use_liger_kernel:  # only then: caches from before this part stay valid
        parts.append(["liger", trainer.args.liger_kernel_config])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def tokens_hash(dataset) -> str:
    """Hash of the pairs' token ids in order (the datasets fingerprint would do, but TRL's maps make it differ
    between trials of different seeds)."""
    import pyarrow.compute as pc

    columns = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c in dataset.column_names]
    table = dataset.select_columns(columns).flatten_indices().data.table
    h = hashlib.sha256(str(len(dataset)).encode())
    for name in columns:
        column = table.column(name)
        for part in (pc.list_value_length(column), pc.list_flatten(column)):
            h.update(part.to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return h.hexdigest()


def attach(trainer, cfg, batch_size: int | None = None) -> str:
    """Give the trainer's training set the reference log-probs (from the cache, computed into it on a miss) and have
    the trainer read them instead of running its reference pass. Returns "hit" or "miss"."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, concatenate_datasets

    key = cache_key(trainer, cfg)
    path = cache_root() / "reference_logps" / f"{key}.parquet"
    outcome = "hit"
    with file_lock(path.with_suffix(".lock")):  # packed trials on one GPU: one computes, the others wait and read
        if not path.exists():
            outcome = "miss"
            started = time.perf_counter()
            chosen, rejected = compute(trainer, batch_size or cfg.micro_batch)
            # a name of its own: on storage that nodes share, the lock may not hold across them
            tmp = path.with_name(f"{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
            pq.write_table(pa.table({COLUMNS[0]: chosen.numpy(), COLUMNS[1]: rejected.numpy()}), tmp)
            os.replace(tmp, path)
            print(f"reference log-probs: {len(chosen)} pairs in {time.perf_counter() - started:.1f} s, cached as "
                  f"{path.name}", flush=True)
    logps = Dataset(pq.read_table(path))
    if len(logps) != len(trainer.train_dataset):
        raise RuntimeError(f"{path}: {len(logps)} rows for a training set of {len(trainer.train_dataset)}; "
                           "delete the file to recompute it")
    base = trainer.train_dataset.remove_columns([c for c in COLUMNS if c in trainer.train_dataset.column_names])
    trainer.train_dataset = concatenate_datasets([base, logps], axis=1)
    trainer.precompute_ref_logps = True  # TRL's loss (and CITA's) then reads the columns
    return outcome


def compute(trainer, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every training pair, in the training set's order (TRL's pass, without TRL's cache)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(trainer.train_dataset, batch_size=batch_size, collate_fn=trainer.data_collator,
                        shuffle=False, num_workers=0)
    chosen, rejected = [], []
    for batch in loader:  # in the model's mode as built (eval); TRL disables dropout in DPO's model anyway
        batch = {k: v.to(trainer.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        c, r = trainer.compute_ref_log_probs(trainer.model, batch)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)
