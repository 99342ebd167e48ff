"""The preference generator, the PKU-SafeRLHF loader (on a committed fixture) and the TRL conversion."""
import io
import re
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pytest

from trainables import data, models, scoring

FIXTURE = Path(__file__).parent / "fixtures" / "pku_saferlhf_sample.parquet"
# Fixture construction (tests/fixtures/make_pku_fixture.py): 14 + 10 + 4 rows with exactly one safe response.
N_ONE_SAFE = 28
N_NO_CATEGORY = 4


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer(models.TINY)


@pytest.fixture(scope="module")
def generated():
    return data.generate_preferences(n_train=2000, n_eval=300, data_seed=7)


@pytest.fixture(scope="module")
def raw_pku():
    return pd.read_parquet(FIXTURE)


def parquet_bytes(ds: datasets.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.to_parquet(buf)
    return buf.getvalue()


# ================================================================================================
# Generator
# ================================================================================================
def test_generator_is_deterministic_per_seed():
    a_train, a_eval = data.generate_preferences(200, 50, data_seed=3)
    b_train, b_eval = data.generate_preferences(200, 50, data_seed=3)
    assert parquet_bytes(a_train) == parquet_bytes(b_train)
    assert parquet_bytes(a_eval) == parquet_bytes(b_eval)
    c_train, c_eval = data.generate_preferences(200, 50, data_seed=4)
    assert c_train["prompt"] != a_train["prompt"]
    assert c_eval["prompt"] != a_eval["prompt"]


def test_held_out_does_not_depend_on_n_train():
    # Every config of a study is scored on the same held-out items, whatever its training size.
    small = data.generate_preferences(50, 40, data_seed=3)[1]
    large = data.generate_preferences(500, 40, data_seed=3)[1]
    assert small.to_list() == large.to_list()


def test_generator_sizes_columns_ids(generated):
    train, held = generated
    assert (len(train), len(held)) == (2000, 300)
    assert tuple(train.column_names) == tuple(held.column_names) == data.COLUMNS
    ids = list(train["item_id"]) + list(held["item_id"])
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"gen-\d{6}", i) for i in ids)
    assert set(train["kind"]) == {"harmful", "helpful", "style", "scope"}


def test_no_held_out_prompt_in_train(generated):
    train, held = generated
    # Capitals, facts and definitions have only ~50-150 wordings each: a per-item split would leak many.
    assert not set(train["prompt"]) & set(held["prompt"])
    # Stronger: the *question* is held out, not just its wording (e.g. no country's capital in both).
    countries = lambda ds: {m.group(1) for p in ds["prompt"] for m in [re.search(r"capital of (.+?)[?.]$", p)] if m}
    assert countries(held) and not countries(train) & countries(held)


def test_generator_diversity_and_length(generated, tok):
    train, _ = generated
    assert len(set(train["prompt"])) > 500
    assert len(set(train["system"])) > 50
    lengths = [len(ids) for ids in tok(list(train["chosen"]) + list(train["rejected"]))["input_ids"]]
    assert max(lengths) <= 64  # short, so a 135M model trains in seconds per step on a CPU


def test_labels_agree_with_the_refusal_scorer(generated):
    df = pd.concat([d.to_pandas() for d in generated])
    chosen_refusal = df["chosen"].map(scoring.refusal_confidence)
    rejected_refusal = df["rejected"].map(scoring.refusal_confidence)
    assert (df["should_refuse"] == df["kind"].isin(["harmful", "scope"])).all()
    refuse = df["should_refuse"]
    assert (chosen_refusal[refuse] >= 0.5).all()  # chosen is a refusal where one is wanted ...
    assert (chosen_refusal[~refuse] == 0.0).all()  # ... and free of any refusal phrase where not
    assert (rejected_refusal[df["kind"] == "harmful"] == 0.0).all()  # harmful rejected = compliance


def test_instruction_flips_the_label(generated):
    df = generated[0].to_pandas()
    by_prompt = df.groupby("prompt")
    # Same user prompt, different system turns, chosen and rejected swapped.
    swapped = df.merge(df, on="prompt", suffixes=("", "_b"))
    swapped = swapped[(swapped.system != swapped.system_b) & (swapped.chosen == swapped.rejected_b)
                      & (swapped.rejected == swapped.chosen_b)]
    assert len(swapped) > 100
    # Refusal itself flips: the same benign question is refused under a scope instruction, answered otherwise.
    flips = by_prompt["should_refuse"].nunique()
    benign_flips = [p for p in flips[flips > 1].index if "scope" in set(by_prompt.get_group(p)["kind"])]
    assert len(benign_flips) > 20


def test_helpful_answers_are_correct(generated):
    df = pd.concat([d.to_pandas() for d in generated])
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b,
           "divided by": lambda a, b: a / b}
    factors = {("minutes", "hours"): 60, ("seconds", "minutes"): 60, ("centimeters", "meters"): 100,
               ("grams", "kilograms"): 1000, ("days", "weeks"): 7, ("months", "years"): 12,
               ("millimeters", "centimeters"): 10, ("hours", "days"): 24}
    known_capitals = {"France": "Paris", "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra",
                      "Egypt": "Cairo", "Turkey": "Ankara", "New Zealand": "Wellington"}
    checked = {"arith": 0, "units": 0, "capital": 0}
    helpful = df[df.kind == "helpful"]
    for chosen, rejected in zip(helpful.chosen, helpful.rejected):
        if m := re.fullmatch(r"(\d+) (plus|minus|times|divided by) (\d+) equals (\d+)\.", chosen):
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert ops[op](a, b) == c, chosen
            if w := re.fullmatch(r".* equals (\d+)\.", rejected):
                assert int(w[1]) != c, rejected  # the wrong answer is wrong
            checked["arith"] += 1
        elif m := re.fullmatch(r"There are (\d+) (\w+) in (\d+) (\w+)\.", chosen):
            assert int(m[1]) == int(m[3]) * factors[(m[2], m[4])], chosen
            checked["units"] += 1
        elif (m := re.fullmatch(r"The capital of (.+) is (.+)\.", chosen)) and m[1] in known_capitals:
            assert m[2] == known_capitals[m[1]], chosen
            checked["capital"] += 1
    assert all(n > 5 for n in checked.values()), checked


def test_style_items_follow_their_instruction(generated):
    df = generated[0].to_pandas()
    style = df[df.kind == "style"]
    json_sys = style.system.str.contains("JSON object")
    assert style[json_sys].chosen.str.startswith('{"answer": ').all()
    assert not style[~json_sys & style.system.str.contains("without JSON")].chosen.str.startswith("{").any()
    one = style.system.str.contains("one short sentence")
    assert (style[one].chosen.str.count(r"\. ") == 0).all()  # one sentence
    assert (style[one].rejected.str.count(r"\. ") >= 2).all()  # three sentences
    french = style.system.str.contains("in French")
    assert style[french].chosen.str.contains(r"égale|Il y a").all()


# ================================================================================================
# PKU-SafeRLHF
# ================================================================================================
def test_pku_filter_keeps_pairs_with_exactly_one_safe_response(raw_pku):
    ds = data.load_pku_saferlhf(str(FIXTURE))
    assert len(ds) == N_ONE_SAFE == (raw_pku.is_response_0_safe != raw_pku.is_response_1_safe).sum()
    assert tuple(ds.column_names) == data.COLUMNS
    assert set(ds["kind"]) == {"harmful"} and all(ds["should_refuse"])


def test_pku_chosen_is_the_safe_response(raw_pku):
    for item in data.load_pku_saferlhf(str(FIXTURE)):
        row = raw_pku.iloc[int(item["item_id"].removeprefix("pku-"))]
        assert item["prompt"] == row.prompt
        safe = 0 if row.is_response_0_safe else 1
        assert item["chosen"] == row[f"response_{safe}"]
        assert item["rejected"] == row[f"response_{1 - safe}"]
        assert item["chosen"].startswith("Safe reply")  # the fixture labels its texts


def test_pku_system_turn_from_the_unsafe_response_categories(raw_pku):
    items = {r["item_id"]: r for r in data.load_pku_saferlhf(str(FIXTURE))}
    # Row 0: unsafe response tagged Privacy Violation + Cybercrime (in the dataset's key order); the safe
    # response's (spurious) Copyright Issues tag must not leak in.
    assert items["pku-0"]["system"] == (
        "You are a helpful AI assistant. You must REFUSE any requests involving privacy violation, cybercrime. "
        "Always prioritize user safety over helpfulness."
    )
    assert items["pku-0"]["category"] == "Privacy Violation, Cybercrime"
    no_category = [
        f"pku-{i}" for i, r in raw_pku.iterrows() if r.is_response_0_safe != r.is_response_1_safe
        and not any(r[f"response_{1 if r.is_response_0_safe else 0}_harm_category"].values())
    ]
    assert len(no_category) == N_NO_CATEGORY
    for item_id in no_category:
        assert items[item_id]["system"] == "You are a helpful and safe AI assistant. Always prioritize user safety."
        assert items[item_id]["category"] == ""


def test_pku_sample_n(raw_pku):
    full = set(data.load_pku_saferlhf(str(FIXTURE))["item_id"])
    a = data.load_pku_saferlhf(str(FIXTURE), n=5, seed=1)["item_id"]
    assert len(a) == 5 and set(a) <= full
    assert a == data.load_pku_saferlhf(str(FIXTURE), n=5, seed=1)["item_id"]


def test_pku_splits(raw_pku):
    train, held = data.load_preferences(str(FIXTURE), n_train=10, n_eval=4, data_seed=0)
    assert (len(train), len(held)) == (10, 4)
    assert len(set(held["prompt"])) == 4  # one pair per held-out prompt
    assert not set(train["prompt"]) & set(held["prompt"])  # PKU repeats prompts across pairs: none may leak
    again = data.load_preferences(str(FIXTURE), n_train=10, n_eval=4, data_seed=0)
    assert again[0].to_list() == train.to_list() and again[1].to_list() == held.to_list()
    other = data.load_preferences(str(FIXTURE), n_train=10, n_eval=4, data_seed=1)
    assert set(other[1]["item_id"]) != set(held["item_id"])


def test_pku_train_is_capped_with_a_warning(raw_pku):
    with pytest.warns(UserWarning, match="n_train=1000"):
        train, held = data.load_preferences(str(FIXTURE), n_train=1000, n_eval=3, data_seed=0)
    kept = raw_pku[raw_pku.is_response_0_safe != raw_pku.is_response_1_safe]
    assert len(train) == (~kept.prompt.isin(held["prompt"])).sum()
    with pytest.raises(ValueError, match="n_eval"):
        data.load_preferences(str(FIXTURE), n_train=10, n_eval=1000, data_seed=0)


def test_pku_from_a_directory(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "train.parquet")
    train, held = data.load_preferences(str(tmp_path), n_train=5, n_eval=2, data_seed=0)
    assert (len(train), len(held)) == (5, 2)


def test_pku_hub_source_asks_the_hub_for_the_train_split(monkeypatch):
    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, kwargs.get("split")))
        return datasets.Dataset.from_parquet(str(FIXTURE))

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    train, held = data.load_preferences("pku_saferlhf", n_train=5, n_eval=2, data_seed=0)
    assert calls == [("PKU-Alignment/PKU-SafeRLHF", "train")]
    assert (len(train), len(held)) == (5, 2)


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="generated.*pku_saferlhf.*'no/such/file.parquet'"):
        data.load_preferences("no/such/file.parquet", 10, 2, 0)


# ================================================================================================
# TRL formats
# ================================================================================================
@pytest.fixture(scope="module")
def small():
    return data.generate_preferences(6, 1, data_seed=0)[0]


def test_to_trl_sft(small, tok):
    out = data.to_trl(small, "chatml", tok, "sft")
    assert out.column_names == ["item_id", "prompt", "completion"]
    assert out["item_id"] == small["item_id"]
    for row, src in zip(out, small):
        assert row["prompt"] == (f"<|im_start|>system\n{src['system']}<|im_end|>\n"
                                 f"<|im_start|>user\n{src['prompt']}<|im_end|>\n<|im_start|>assistant\n")
        assert row["completion"] == src["chosen"] + "<|im_end|>\n"


@pytest.mark.parametrize("method", ["dpo", "cita"])
def test_to_trl_pairs_keep_the_system_turn(small, tok, method):
    out = data.to_trl(small, "llama3", tok, method)
    assert out.column_names == ["item_id", "prompt", "chosen", "rejected"]
    for row, src in zip(out, small):
        assert src["system"] in row["prompt"] and row["prompt"].endswith(
            f"{src['prompt']}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert row["chosen"] == src["chosen"] + "<|eot_id|>"
        assert row["rejected"] == src["rejected"] + "<|eot_id|>"


def test_to_trl_without_system(small, tok):
    out = data.to_trl(small, "llama3", tok, "dpo", with_system=False)
    assert all("<|start_header_id|>system" not in p for p in out["prompt"])
    assert all(src["system"] not in p for p, src in zip(out["prompt"], small))


def test_to_trl_rejects_unknown_method_and_template(small, tok):
    with pytest.raises(ValueError, match="method"):
        data.to_trl(small, "llama3", tok, "ppo")
    with pytest.raises(ValueError, match="template"):
        data.to_trl(small, "vicuna", tok, "sft")


def test_cached_trl_stores_once_per_input_and_reads_back_the_same_rows(small, tok, tmp_path):
    first = data.cached_trl(small, "chatml", tok, "dpo", tmp_path)
    again = data.cached_trl(small, "chatml", tok, "dpo", tmp_path)
    expected = data.to_trl(small, "chatml", tok, "dpo").remove_columns("item_id")
    assert first.to_list() == again.to_list() == expected.to_list()
    assert len(list(tmp_path.iterdir())) == 1
    assert first.cache_files and first.cache_files[0]["filename"].startswith(str(tmp_path))  # Arrow-backed
    # anything the rendering depends on gets its own entry: method family, template, the data itself
    data.cached_trl(small, "chatml", tok, "cita", tmp_path)  # same pairs as dpo: shared
    data.cached_trl(small, "chatml", tok, "sft", tmp_path)
    data.cached_trl(small, "alpaca", tok, "dpo", tmp_path)
    data.cached_trl(small.select(range(3)), "chatml", tok, "dpo", tmp_path)
    assert len(list(tmp_path.iterdir())) == 4
    data.cached_trl(small, "chatml", tok, "dpo", tmp_path, max_prompt_tokens=16)  # truncation changes the rows
    data.cached_trl(small, "chatml", tok, "sft", tmp_path, max_prompt_tokens=16)  # sft prompts are not truncated
    assert len(list(tmp_path.iterdir())) == 5


@pytest.mark.parametrize("method", ["dpo", "cita"])
def test_pair_prompts_keep_their_last_max_prompt_tokens(small, tok, method):
    """TRL 1.16 has no max_prompt_length: prompts longer than it keep their last tokens (the research's TRL
    did so), short ones and every completion are untouched, and SFT prompts are not truncated."""
    full = data.to_trl(small, "llama3", tok, method)
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in full["prompt"]]
    n = sorted(lengths)[len(lengths) // 2]  # about half the prompts are longer
    cut = data.to_trl(small, "llama3", tok, method, max_prompt_tokens=n)
    for before, after, length in zip(full, cut, lengths):
        ids = tok(after["prompt"], add_special_tokens=False)["input_ids"]
        if length <= n:
            assert after["prompt"] == before["prompt"]
        else:
            assert before["prompt"].endswith(after["prompt"]) and len(after["prompt"]) < len(before["prompt"])
            assert ids == tok(before["prompt"], add_special_tokens=False)["input_ids"][-n:]
        assert (after["chosen"], after["rejected"]) == (before["chosen"], before["rejected"])
    assert any(length > n for length in lengths)
    sft = data.to_trl(small, "llama3", tok, "sft", max_prompt_tokens=n)
    assert sft["prompt"] == data.to_trl(small, "llama3", tok, "sft")["prompt"]
