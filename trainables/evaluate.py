"""Evaluate a trained policy on held-out pairs: one row per prompt, summaries as eval/* metrics.

Every held-out pair gets policy and reference (adapter disabled) log-probs of its chosen and rejected
response: preference accuracy and the implicit reward margin. The first `eval.n_generate` prompts are also
answered by sampling (the research's temperature 0.7, top-p 0.9) and scored with its 0-10 quality score and
refusal correctness. Item ids are shared by every config and seed of a study, so analyses can pair by prompt.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time

import numpy as np
import pandas as pd
import torch

from trainables import models, scoring, templates
from trainables.config import TrialConfig


def _reference(model):
    """Context in which the model is its own reference: adapters off (a PEFT model), else unchanged."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def _reference_logps(model, tokenizer, prompts, chosen, rejected, batch_size) -> np.ndarray:
    with _reference(model):
        return np.stack([sequence_logps(model, tokenizer, prompts, chosen, batch_size),
                         sequence_logps(model, tokenizer, prompts, rejected, batch_size)])


def _cached_reference(cfg: TrialConfig, item_ids: list[str], compute) -> np.ndarray:
    """Reference log-probs depend only on the base model, its precision, the template and the held-out set, not
    on the method, adapter or seed: every trial of a study shares them, so compute once per machine and reuse
    (half of the evaluation's forward passes)."""
    key = hashlib.sha256(json.dumps([cfg.model, cfg.precision, cfg.template, cfg.data, cfg.data_seed, item_ids])
                         .encode()).hexdigest()[:20]
    path = models.cache_root() / "reference_logps" / f"{key}.npy"
    if path.exists():
        return np.load(path)
    ref = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, ref)
    os.replace(tmp, path)  # atomic: concurrent trials may race to write the same values
    return ref


@torch.no_grad()
def sequence_logps(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int) -> np.ndarray:
    """Sum of log p(completion | prompt) per pair, tokenized as TRL does (prompt ids + completion ids)."""
    device = next(model.parameters()).device
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    seqs = [p + c for p, c in zip(p_ids, c_ids)]
    order = np.argsort([len(s) for s in seqs], kind="stable")  # batch similar lengths: little padding
    out = np.zeros(len(seqs))
    for start in range(0, len(seqs), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(seqs[j]) for j in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        comp = torch.zeros_like(ids, dtype=torch.bool)
        for row, j in enumerate(idx):
            ids[row, :len(seqs[j])] = torch.tensor(seqs[j])
            attn[row, :len(seqs[j])] = 1
            comp[row, len(p_ids[j]):len(seqs[j])] = True
        ids, attn, comp = ids.to(device), attn.to(device), comp.to(device)
        out[idx] = (_token_logps(model, ids, attn) * comp[:, 1:]).sum(1).cpu().numpy()
    return out


LOGITS_CHUNK_TOKENS = 1024  # an 8B model's fp32 logits are 0.5 GB per 1024 tokens


def _token_logps(model, ids, attn) -> torch.Tensor:
    """log p(ids[:, 1:]) per token, with the LM head applied to LOGITS_CHUNK_TOKENS positions at a time: the full
    batch x seq x vocab logits (fp32 and their log-softmax: 63 GiB for an 8B model at batch 32 x 2048) never exist."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "final_logit_softcapping", None):  # logits post-processed in forward: take them whole
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        return torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
    hidden = base.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state[:, :-1]
    head = base.get_output_embeddings()
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)
    out = torch.empty(targets.shape, dtype=torch.float32, device=ids.device)
    for start in range(0, len(targets), LOGITS_CHUNK_TOKENS):
        rows = slice(start, start + LOGITS_CHUNK_TOKENS)
        logits = head(hidden[rows]).float()
        out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - logits.logsumexp(-1)
    return out.view(ids.shape[0], -1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: TrialConfig) -> list[str]:
    """Sampled answers, cut at the template's end of turn (plain text for some model/template pairs, e.g.
    Llama-3's <|eot_id|> on SmolLM2, so the model's own eos would not stop it)."""
    device = next(model.parameters()).device
    stop = templates.end_of_turn(cfg.template, tokenizer)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only generation pads on the left
    torch.manual_seed(cfg.seed)  # sampling is part of the trial: same seed, same generations
    texts = []
    try:
        for i in range(0, len(prompts), cfg.eval.batch_size):
            batch = tokenizer(prompts[i:i + cfg.eval.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            sample = cfg.eval.temperature > 0
            out = model.generate(**batch, max_new_tokens=cfg.eval.max_new_tokens, do_sample=sample,
                                 temperature=cfg.eval.temperature if sample else None,
                                 top_p=cfg.eval.top_p if sample else None, stop_strings=[stop],
                                 tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id, use_cache=True)
            texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    for marker in (stop, tokenizer.eos_token, tokenizer.pad_token):
        texts = [t.split(marker)[0] if marker else t for t in texts]
    return [t.strip() for t in texts]


def evaluate(model, tokenizer, held_out, cfg: TrialConfig) -> tuple[pd.DataFrame, dict[str, float]]:
    """(per-item DataFrame, eval/* metrics) for a held-out preference dataset (data.py columns)."""
    model.eval()
    df = held_out.to_pandas()
    prompts = [templates.render_prompt(cfg.template, s, u, tokenizer) for s, u in zip(df["system"], df["prompt"])]
    chosen = [templates.render_completion(cfg.template, c, tokenizer) for c in df["chosen"]]
    rejected = [templates.render_completion(cfg.template, r, tokenizer) for r in df["rejected"]]
    bs = cfg.eval.batch_size
    clock = time.perf_counter()
    items = df[["item_id", "kind", "should_refuse"]].copy()
    items["logp_chosen"] = sequence_logps(model, tokenizer, prompts, chosen, bs)
    items["logp_rejected"] = sequence_logps(model, tokenizer, prompts, rejected, bs)
    ref = _cached_reference(cfg, items.item_id.tolist(), lambda: _reference_logps(model, tokenizer, prompts, chosen,
                                                                                  rejected, bs))
    items["ref_logp_chosen"], items["ref_logp_rejected"] = ref[0], ref[1]
    delta = (items.logp_chosen - items.ref_logp_chosen) - (items.logp_rejected - items.ref_logp_rejected)
    items["pref_correct"] = (delta > 0).astype(float)
    items["reward_margin"] = cfg.beta * delta

    n_gen = min(cfg.eval.n_generate, len(items))
    metrics = {"eval/pref_accuracy": items.pref_correct.mean(), "eval/reward_margin": items.reward_margin.mean(),
               "eval/logp_margin": (items.logp_chosen - items.logp_rejected).mean(),
               "eval/n_items": float(len(items)), "eval/n_generated": float(n_gen),
               "time/eval_logps_s": time.perf_counter() - clock}
    clock = time.perf_counter()
    if n_gen:
        model.config.use_cache = True
        gens = generate(model, tokenizer, prompts[:n_gen], cfg)
        scores = scoring.score_many(gens, items.should_refuse[:n_gen].tolist())
        items["generation"] = pd.Series(gens + [None] * (len(items) - n_gen), dtype=object)
        for col in ("quality", "fluency", "coherence", "alignment", "refusal"):
            items[col] = np.r_[scores[col].to_numpy(float), np.full(len(items) - n_gen, np.nan)]
        items["refusal_correct"] = np.r_[scores["refusal_correct"].to_numpy(float), np.full(len(items) - n_gen, np.nan)]
        for col in ("quality", "fluency", "coherence", "alignment"):
            metrics[f"eval/{col}"] = float(np.nanmean(items[col]))
        metrics["eval/refusal_accuracy"] = float(np.nanmean(items["refusal_correct"]))
    metrics["time/eval_generate_s"] = time.perf_counter() - clock
    return items, {k: float(v) for k, v in metrics.items()}
