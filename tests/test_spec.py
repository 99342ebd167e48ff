"""Spec validation, expansion and trial keys."""
import pytest

from sweeps import profiles
from sweeps.cli import apply_overrides
from sweeps.spec import Spec, SpecError, expand, trial_table


def _spec(**kw):
    raw = {"study": "t", "base": {"precision": "fp32"}, "grid": {"method": ["sft", "dpo"]}, "seeds": [1, 2]}
    raw.update(kw)
    return Spec.load(raw)


def test_grid_times_variants_times_seeds():
    spec = _spec(variants=[{"name": "a"}, {"name": "b", "lr": 1e-5}])
    trials = expand(spec)
    assert len(trials) == 2 * 2 * 2
    assert {(t.variant, t.config.method, t.config.seed) for t in trials} == {
        (v, m, s) for v in "ab" for m in ("sft", "dpo") for s in (1, 2)}
    assert all(t.config.lr == 1e-5 for t in trials if t.variant == "b")


def test_keys_are_stable_and_distinct():
    a, b = expand(_spec()), expand(_spec())
    assert [t.key for t in a] == [t.key for t in b]
    assert len({t.key for t in a}) == len(a)
    # the seed changes the trial key but not the config key; the study name changes neither
    s1, s2 = [t for t in a if t.config.method == "sft"]
    assert s1.key != s2.key and s1.config.config_key == s2.config.config_key
    other = expand(_spec(study="other"))
    assert [t.key for t in other] == [t.key for t in a]


def test_identical_variants_collapse_to_one_trial():
    trials = expand(_spec(variants=[{"name": "x"}, {"name": "y"}], grid={}, seeds=[1]))
    assert len(trials) == 1


@pytest.mark.parametrize("raw, words", [
    ({"grid": {"method": ["sft", "ppo"]}}, ["method", "'ppo'", "sft, dpo, cita"]),
    ({"base": {"adapter": "qlora"}}, ["adapter", "'qlora'", "lora, grit"]),
    ({"base": {"template": "vicuna"}}, ["template", "llama3, alpaca, chatml, model"]),
    ({"base": {"lr": -1}}, ["lr", "-1", "greater than 0"]),
    ({"base": {"lrr": 1}}, ["unknown field 'lrr'", "lr"]),
    ({"base": {"grit": {"dampingg": 1}}}, ["grit.dampingg"]),
    ({"grid": {"seed": 3}}, ["grid.seed", "non-empty list"]),
    ({"seeds": ["a"]}, ["seeds", "integers"]),
    ({"extra": 1}, ["unknown spec key", "extra"]),
])
def test_bad_fields_name_field_value_and_allowed(raw, words):
    with pytest.raises(SpecError) as err:
        expand(_spec(**raw))
    for w in words:
        assert w in str(err.value)


def test_quantized_precision_needs_cuda():
    with pytest.raises(SpecError, match="nf4.*CUDA.*allowed here: fp32, bf16"):
        expand(_spec(base={"precision": "nf4"}), cuda=False)
    assert expand(_spec(base={"precision": "nf4"}), cuda=True)


def test_step_scale_keeps_ratios_but_not_overrides():
    spec = _spec(variants=[{"name": "short", "max_steps": 300}, {"name": "long", "max_steps": 1000}], grid={},
                 seeds=[1])
    short, long = expand(spec, step_scale=0.05)
    assert (short.config.max_steps, long.config.max_steps) == (15, 50)
    # GRIT's periods (research: 50 steps) shrink with the run, so short runs still precondition and reproject
    assert (short.config.grit.kfac_update_freq, short.config.grit.reprojection_freq) == (2, 2)
    spec.overrides = {"max_steps": 7}
    assert {t.config.max_steps for t in expand(spec, step_scale=0.05)} == {7}


def test_liger_kernels_are_an_execution_choice_of_the_8b_profiles_only():
    from sweeps import profiles

    assert {name: profiles.get(name).execution()["liger_kernel"] for name in profiles.PROFILE_NAMES} == {
        "local": False, "gpu": False, "lambda": True, "tacc": True}


def test_profile_then_spec_then_override_precedence():
    spec = _spec(base={"precision": "fp32", "n_train": 10}, grid={}, seeds=[1])
    (t,) = expand(spec, {"n_train": 99, "n_eval": 7})
    assert (t.config.n_train, t.config.n_eval) == (10, 7)


def test_dry_run_table_lists_every_trial():
    trials = expand(_spec())
    table = trial_table(trials)
    assert all(t.key in table for t in trials) and table.endswith("4 trials")


def test_study_scripts_expand_under_every_profile():
    from sweeps import cita_fixes, multi_seed

    for name in profiles.PROFILE_NAMES:
        p = profiles.get(name)
        ms = expand(Spec.load(multi_seed.spec(p)), p.overrides, cuda=p.cuda, step_scale=p.step_scale)
        assert len(ms) == 3 * 2 * len(p.precisions) * 3
        cf = expand(Spec.load(cita_fixes.spec(p)), p.overrides, cuda=p.cuda, step_scale=p.step_scale)
        assert len(cf) == 4 * 3
        long = [t for t in cf if t.variant == "exp3_long"][0].config.max_steps
        base = [t for t in cf if t.variant == "baseline"][0].config.max_steps
        assert long > 3 * base


def test_nested_overrides_keep_the_profiles_other_fields():
    # `--set eval.n_generate=3` changes that field only; a variant's trainer knob joins the profile's
    spec = Spec.load({"study": "nested", "variants": [{"method": "dpo", "trainer": {"max_grad_norm": 0.5}}]})
    apply_overrides(spec, ["eval.n_generate=3"])
    profile = {"eval": {"n_generate": 8, "max_new_tokens": 24}, "trainer": {"pad_to_multiple_of": 64}}
    (trial,) = expand(spec, profile)
    assert (trial.config.eval.n_generate, trial.config.eval.max_new_tokens) == (3, 24)
    assert trial.config.trainer == {"pad_to_multiple_of": 64, "max_grad_norm": 0.5}
    assert profile["eval"] == {"n_generate": 8, "max_new_tokens": 24}  # the profile itself is left as it was
