"""Sweep spec: a declarative description of a study (YAML file or Python dict), validated and expanded into trials.

    study: cita_fixes
    base:     {method: cita, adapter: lora, precision: bf16, template: llama3}   # fixed TrialConfig fields
    grid:     {lr: [2e-5, 5e-6]}                  # cross product over any TrialConfig field
    variants: [{name: baseline}, {name: alpaca, template: alpaca, lr: 5.0e-6}]   # a union of override sets
    seeds:    [42, 123, 456]

A trial's config = TrialConfig defaults < profile < base < grid point < variant < overrides, for every seed.
Validation happens before Ray starts; every error names the field, the value and what is allowed.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from trainables.config import QUANTIZED, GritConfig, TrialConfig

SPEC_KEYS = ("study", "base", "grid", "variants", "seeds", "overrides")


_DEFAULTS = {k: f.default for k, f in TrialConfig.model_fields.items()}


class SpecError(ValueError):
    """A spec that cannot run; the message says which field, which value, and what is allowed."""


@dataclass(frozen=True)
class Trial:
    config: TrialConfig
    variant: str = ""

    @property
    def key(self) -> str:
        return self.config.trial_key

    @property
    def label(self) -> str:
        """Human name of the config without its seed: how tables and figures name it."""
        c = self.config
        parts = [c.method, c.adapter, c.precision, c.template, f"lr={c.lr:g}", f"steps={c.max_steps}"]
        return "|".join(([self.variant] if self.variant else []) + parts)


@dataclass
class Spec:
    study: str
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    seeds: list[int] = field(default_factory=lambda: [42])
    overrides: dict[str, Any] = field(default_factory=dict)  # win over everything (the command line's --set)

    @classmethod
    def load(cls, source: str | Path | dict) -> "Spec":
        raw = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text())
        if not isinstance(raw, dict):
            raise SpecError(f"a spec must be a mapping with keys {', '.join(SPEC_KEYS)}; got {type(raw).__name__}")
        unknown = set(raw) - set(SPEC_KEYS)
        if unknown:
            raise SpecError(f"unknown spec key(s) {sorted(unknown)}; allowed: {', '.join(SPEC_KEYS)}")
        if not raw.get("study"):
            raise SpecError("spec field 'study' is required (it names the MLflow experiment)")
        grid = raw.get("grid") or {}
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise SpecError(f"grid.{k} = {v!r}: a grid axis must be a non-empty list")
        seeds = raw.get("seeds") or [42]
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise SpecError(f"seeds = {seeds!r}: seeds must be integers")
        variants = raw.get("variants") or [{}]
        if not all(isinstance(v, dict) for v in variants):
            raise SpecError(f"variants = {variants!r}: each variant must be a mapping")
        return cls(study=str(raw["study"]), base=dict(raw.get("base") or {}), grid=dict(grid),
                   variants=[dict(v) for v in variants], seeds=list(seeds),
                   overrides=dict(raw.get("overrides") or {}))

    def to_dict(self) -> dict:
        return {"study": self.study, "base": self.base, "grid": self.grid, "variants": self.variants,
                "seeds": self.seeds, "overrides": self.overrides}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _explain(err: ValidationError, where: str) -> str:
    """Turn pydantic's errors into 'where.field = value: allowed ...' lines."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        name = e["loc"][0] if e["loc"] else ""
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(TrialConfig.model_fields) if len(e["loc"]) == 1 else "see trainables/config.py"
            lines.append(f"{where}: unknown field '{path}'; allowed fields: {allowed}")
            continue
        if e["type"] == "literal_error":
            ann = TrialConfig.model_fields[name].annotation if name in TrialConfig.model_fields else None
            allowed = ", ".join(map(str, get_args(ann))) if ann is not None else e["msg"]
            lines.append(f"{where}: {path} = {e.get('input')!r} is not allowed; allowed values: {allowed}")
            continue
        lines.append(f"{where}: {path or 'config'} = {e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


def _scale_steps(raw: dict, scale: float) -> dict:
    """Shrink every step count of a config by `scale`: training length, warmup, and GRIT's refresh and
    reprojection periods and its sampling interval (else a short run would end before GRIT has statistics or
    refreshes them, and GRIT would be LoRA)."""
    raw = dict(raw)
    for k in ("max_steps", "warmup_steps"):
        raw[k] = max(k == "max_steps", round(float(raw.get(k, _DEFAULTS[k])) * scale))
    grit = dict(raw.get("grit") or {})
    for k in ("kfac_update_freq", "reprojection_freq", "sample_every"):
        grit[k] = max(1, round(float(grit.get(k, GritConfig.model_fields[k].default)) * scale))
    raw["grit"] = grit
    return raw


def _validate_precision(cfg: TrialConfig, where: str, cuda: bool) -> None:
    if cfg.precision in QUANTIZED and not cuda:
        raise SpecError(
            f"{where}: precision = {cfg.precision!r} needs a CUDA GPU (bitsandbytes 4-/8-bit kernels) and this "
            "profile/machine has none; allowed here: fp32, bf16. Use --profile gpu/lambda/tacc on a GPU machine."
        )


def layered(*layers: dict) -> dict:
    """Later layers win, field by field inside nested sections too: `--set eval.n_generate=4` keeps the profile's
    other eval settings, and a spec's `trainer` knob keeps the profile's."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            out[key] = layered(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
                else value
    return out


def expand(spec: Spec, profile_overrides: dict[str, Any] | None = None, *, cuda: bool = False,
           step_scale: float = 1.0) -> list[Trial]:
    """Validate and expand a spec into trials (grid x variants x seeds), in a stable order.

    `cuda` says whether trials will get a CUDA GPU; without one, quantized precisions are refused here,
    before Ray starts. `step_scale` shrinks every max_steps (and warmup) for small profiles while keeping
    the study's relative lengths (Exp3's 1000 steps stay longer than 300).
    """
    profile_overrides = profile_overrides or {}
    axes = list(spec.grid)
    trials, seen = [], set()
    for variant in spec.variants:
        variant = dict(variant)
        name = str(variant.pop("name", ""))
        for point in itertools.product(*(spec.grid[a] for a in axes)):
            for seed in spec.seeds:
                raw = layered(profile_overrides, spec.base, dict(zip(axes, point)), variant)
                where = f"variant {name!r}" if name else "spec"
                try:
                    if step_scale != 1.0:  # scale the study's lengths, never an explicit override
                        raw = _scale_steps(raw, step_scale)
                    cfg = TrialConfig(**layered(raw, spec.overrides, {"seed": seed, "study": spec.study}))
                except ValidationError as e:
                    raise SpecError(_explain(e, where)) from None
                except (TypeError, ValueError) as e:
                    raise SpecError(f"{where}: max_steps/warmup_steps must be numbers ({e})") from None
                _validate_precision(cfg, where, cuda)
                trial = Trial(cfg, name)
                if trial.key in seen:  # two variants that resolve to one config run once
                    continue
                seen.add(trial.key)
                trials.append(trial)
    if not trials:
        raise SpecError("the spec expands to no trials")
    return trials


def trial_table(trials: list[Trial]) -> str:
    """The --dry-run table: one line per trial."""
    head = f"{'#':>3}  {'trial_key':16}  {'seed':>5}  config"
    rows = [f"{i:>3}  {t.key:16}  {t.config.seed:>5}  {t.label}" for i, t in enumerate(trials, 1)]
    return "\n".join([head, *rows, f"{len(trials)} trials"])
