"""The command line every study script shares: profile, cluster address, MLflow store, dry run, overrides."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from sweeps import profiles
from sweeps.runner import SweepResult, run_sweep
from sweeps.spec import Spec, SpecError, layered
from trainables import tracking


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="local", choices=profiles.PROFILE_NAMES,
                   help="where it runs: local = embedded SmolLM2 on this machine (default); gpu = one GPU node; "
                        "lambda / tacc = the research's 8B settings on a cluster")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' on a cluster node, or ray://host:10001); default: local Ray")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./runs/mlflow.db)")
    p.add_argument("--storage", default=None, help="Ray Tune storage path (default: $ALIGNSWEEP_STORAGE or ./runs/ray)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the study's seeds")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a trial field for every trial, e.g. --set max_steps=20 --set eval.n_generate=0 "
                        "(values parsed as YAML)")
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on trials running at once")
    p.add_argument("--dry-run", action="store_true", help="print the trial table and exit (nothing runs)")
    p.add_argument("--no-report", action="store_true", help="skip the analysis report at the end")
    p.add_argument("--out", type=Path, default=None, help="report directory (default: runs/reports/<study>)")
    from analysis import sequential

    sequential.add_arguments(p)  # --until-resolved and its knobs
    return p


def parse_overrides(overrides: list[str]) -> dict:
    """`--set FIELD=VALUE` items as a nested dict (eval.n_generate=4 -> {"eval": {"n_generate": 4}}), YAML-typed."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set max_steps=20")
        field, value = item.split("=", 1)
        target = out
        *parents, leaf = field.split(".")
        for name in parents:  # nested fields such as eval.n_generate or grit.damping
            target = target.setdefault(name, {})
        target[leaf] = yaml.safe_load(value)
    return out


def apply_overrides(spec: Spec, overrides: list[str]) -> None:
    spec.overrides = layered(spec.overrides, parse_overrides(overrides))


def main(spec_for_profile, description: str, criteria: str | None = None, argv=None) -> SweepResult | None:
    """Parse the command line, build the study's spec for the chosen profile, run it, then report."""
    args = parser(description).parse_args(argv)
    try:
        profile = profiles.get(args.profile)
        spec = Spec.load(spec_for_profile(profile))
        if args.seeds:
            spec.seeds = args.seeds
        apply_overrides(spec, args.overrides)

        def run(seeds=None, config_keys=None) -> SweepResult:
            if seeds is not None:
                spec.seeds = list(seeds)
            return run_sweep(spec, profile, address=args.address, tracking_uri=args.tracking_uri,
                             storage=args.storage, dry_run=args.dry_run, max_concurrent=args.max_concurrent,
                             config_keys=config_keys)

        result = run()
        if args.until_resolved and not args.dry_run:
            result = _until_resolved(spec, args, result, run, criteria)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.dry_run:
        return result
    print(f"\n{spec.study}: ran {result.ran}, skipped {len(result.skipped)} already finished, "
          f"failed {len(result.failed)}")
    for key, err in result.failed.items():
        print(f"  failed {key}: {err.splitlines()[-1] if err else ''}")
    if not args.no_report:
        out = args.out or tracking.runs_dir() / "reports" / spec.study
        _report(spec.study, result.tracking_uri, out, criteria)
    print(f"\nMLflow store: {result.tracking_uri}")
    if result.tracking_uri.startswith("sqlite:"):
        print(f"Open the UI:  mlflow ui --backend-store-uri {result.tracking_uri}   (then http://127.0.0.1:5000)")
    return result


def _until_resolved(spec: Spec, args, first: SweepResult, run, criteria) -> SweepResult:
    """Adaptive seeds (analysis.sequential): the initial seeds already ran; add seeds only where needed."""
    from analysis import sequential

    rule = sequential.rule_from_args(args, initial_seeds=spec.seeds)
    last = [first]

    def run_batch(seeds, config_keys):
        last[0] = run(seeds, config_keys)

    outcome = sequential.run_until_resolved(run_batch, spec.study, first.tracking_uri, study=criteria, rule=rule,
                                            run_initial=False)
    print(f"until-resolved: stopped after {outcome.looks} looks ({outcome.stop_reason}); the stopping rule and "
          f"every look are logged in MLflow run {outcome.parent_run_id}")
    return last[0]


def _report(study: str, tracking_uri: str, out: Path, criteria: str | None) -> None:
    import analysis

    report = analysis.report(study, tracking_uri=tracking_uri, out_dir=out, criteria=criteria)
    out = Path(out)
    print(f"\nReport:  {report}")
    print(f"Tables:  {out / 'tables'}  (Markdown, LaTeX, CSV)")
    for figure in sorted((out / "figures").glob("*.png")):
        print(f"Figure:  {figure}  (and .pdf)")
