"""Renderings of the real KTAS records (Moon et al., PLOS ONE 2019, CC BY 4.0): shorthand, narrative, ko, mixed.

Every test runs on the bundled real records; the renderings are re-written real records, not real free text.
"""

import random
import re
from collections import Counter

import numpy as np
import pytest

from training.config import (
    ConfigError,
    DataArguments,
    DistillArguments,
    EvalArguments,
    ModelArguments,
    TrainingArguments,
    check_fit_options,
)
from training.data import DataError, render
from training.data.ktas import BUNDLED_KTAS, ktas_examples, load_ktas
from training.data.loading import load_parts
from training.data.readers import read_table
from training.data.render import (
    ABBREVIATIONS,
    DASH_GLOSS,
    EN_ARRIVAL,
    EN_INJURY,
    EN_MENTAL,
    EN_PAIN,
    FIXED_STYLES,
    KO_ARRIVAL,
    KO_INJURY,
    KO_MENTAL,
    KO_PAIN,
    OPTIONAL_ARRIVALS,
    Facts,
    Rendering,
    abbreviate,
    calibration_examples,
    expand_abbreviations,
    korean_gloss,
    mixed_style,
    render_examples,
    render_note,
    vary_complaint,
)
from training.run_dir import RunDirectory

STYLES = ["shorthand", "narrative", "ko", "mixed"]
POST_TRIAGE = ["KTAS_RN", "Diagnosis in ED", "Disposition", "Error_group", "Length of stay_min", "KTAS duration_min"]
POST_TRIAGE.append("mistriage")
HANGUL = re.compile(r"[\uac00-\ud7a3]")
BANKS = [vars(render)[n] for n in dir(render) if n.startswith(("EN_", "KO_")) and n != "KO_GLOSSES"]
BANK_WORDS = set(re.findall(r"[a-z]+", str(BANKS).lower()))  # the words of the phrase banks (not complaint terms)


@pytest.fixture(scope="module")
def frame():
    return read_table(BUNDLED_KTAS, delimiter=";")


@pytest.fixture(scope="module")
def ktas():
    return load_ktas()


@pytest.fixture(scope="module")
def rendered(ktas):
    """Every real record in every style (mixed at epochs 0 and 1)."""
    texts = {style: render_examples(ktas, style, seed=0).texts for style in STYLES}
    texts["mixed-1"] = Rendering(ktas.rendering.records, "mixed", 0).texts(ktas.row_ids, epoch=1)
    return texts


def number(value: str) -> re.Pattern:
    return re.compile(rf"(?<!\d)(?<!\d\.){re.escape(value)}(?!\d)(?!\.\d)")


def words(text: str) -> set[str]:
    """Lower-cased words with every abbreviation expanded and an 'X - Expansion' gloss reduced to its expansion."""
    dash = DASH_GLOSS.match(text.strip())
    if dash:
        text = dash.group(2)
    return set(re.findall(r"[a-z]+", expand_abbreviations(text).lower()))


def test_every_style_renders_every_real_record(rendered, ktas):
    for texts in rendered.values():
        assert len(texts) == len(ktas) == 1267
        assert all(isinstance(t, str) and t.strip() for t in texts)


def test_shorthand_is_todays_note(rendered, ktas):
    assert rendered["shorthand"] == ktas.texts
    assert ktas.texts[0].startswith("CC: right ocular pain. 71M, private vehicle")


def test_same_seed_same_text_other_seed_or_epoch_other_draw(ktas):
    records = ktas.rendering.records
    for style in ("narrative", "ko"):
        assert render_note(records[7], style, 3, 7) == render_note(records[7], style, 3, 7)
        assert render_note(records[7], style, 3, 7, epoch=5) == render_note(records[7], style, 3, 7)  # fixed style
        other_seed = [render_note(records[r], style, 4, r) for r in range(50)]
        assert other_seed != [render_note(records[r], style, 3, r) for r in range(50)]
    mixed = Rendering(records, "mixed", 0)
    ids = np.arange(200)
    assert mixed.texts(ids, 1) == mixed.texts(ids, 1)
    assert mixed.texts(ids, 1) != mixed.texts(ids, 2)


def test_no_post_triage_value_ever_enters_a_rendering(frame, rendered):
    marked = frame.copy()
    for i, column in enumerate(POST_TRIAGE):
        marked[column] = f"LEAK{i}"
    marked["KTAS_expert"] = frame["KTAS_expert"]
    for style in STYLES:
        texts = ktas_examples(marked, "marked", render=style).texts
        assert texts == rendered[style]
        assert not any("LEAK" in t for t in texts)
    # The record's diagnosis never appears (unless the complaint itself says it).
    for style in STYLES:
        for row, text in enumerate(rendered[style]):
            diagnosis = frame["Diagnosis in ED"].iloc[row].strip().lower()
            complaint = frame["Chief_complain"].iloc[row]
            shorthand = rendered["shorthand"][row]
            known = words(complaint) | words(shorthand) | BANK_WORDS  # e.g. diagnosis "Pain": a phrase-bank word
            said = diagnosis in shorthand.lower() or words(diagnosis) <= known
            if len(diagnosis) > 3 and not said:
                assert diagnosis not in text.lower(), (style, row)


def test_phrasing_does_not_follow_the_label(rendered, ktas):
    """Same fields, different labels -> same text: the label cannot choose words."""
    frame = read_table(BUNDLED_KTAS, delimiter=";")
    relabelled = frame.assign(KTAS_expert=np.where(frame["KTAS_expert"].isin(["1", "2", "3"]), "5", "1"))
    for style in ("narrative", "ko", "mixed"):
        assert ktas_examples(relabelled, "relabelled", render=style).texts == rendered[style]


MALE = {
    "narrative": re.compile(r"\b(man|male|gentleman)\b|\d ?M\b|y/o M\b"),
    "ko": re.compile(r"남자|남성|남환|M/\d|\d/M"),
    "shorthand": re.compile(r"\dM\b"),
}
FEMALE = {
    "narrative": re.compile(r"\b(woman|female|lady)\b|\d ?F\b|y/o F\b"),
    "ko": re.compile(r"여자|여성|여환|F/\d|\d/F"),
    "shorthand": re.compile(r"\dF\b"),
}


def style_of(style: str, seed: int, row: int, epoch: int) -> str:
    return mixed_style(seed, row, epoch) if style == "mixed" else style


@pytest.mark.parametrize("style", STYLES)
def test_required_facts_always_appear(rendered, ktas, style):
    for row, text in enumerate(rendered[style]):
        f = Facts.of(ktas.rendering.records[row])
        drawn = style_of(style, 0, row, 0)
        assert number(f.age).search(text), (style, row, text)
        if f.sex:
            assert (MALE if f.sex == "M" else FEMALE)[drawn].search(text), (style, row, text)
            assert not (FEMALE if f.sex == "M" else MALE)[drawn].search(text), (style, row, text)
        for value in (f.nrs, f.sbp, f.dbp, f.hr, f.rr, f.bt, f.spo2):
            if value:
                assert number(value).search(text), (style, row, value, text)
        if f.complaint:
            assert words(f.complaint) <= words(text), (style, row, f.complaint, text)


@pytest.mark.parametrize(("style", "arrival", "injury", "mental", "pain"), [
    ("narrative", EN_ARRIVAL, EN_INJURY, EN_MENTAL, EN_PAIN),
    ("ko", KO_ARRIVAL, KO_INJURY, KO_MENTAL, KO_PAIN),
])  # fmt: skip
def test_only_unremarkable_facts_are_ever_left_out(rendered, ktas, style, arrival, injury, mental, pain):
    omitted = Counter()
    for row, text in enumerate(rendered[style]):
        f = Facts.of(ktas.rendering.records[row])
        checks = [
            ("arrival", f.arrival in OPTIONAL_ARRIVALS, arrival.get(f.arrival, arrival["other"])),
            ("injury", f.injury == "1", injury.get(f.injury, ())),
            ("mental", f.mental == "1", mental.get(f.mental, ())),
            ("pain", f.pain == "0", () if f.nrs else pain.get(f.pain, ())),
        ]
        for name, optional, bank in checks:
            if not bank:
                continue
            present = any(phrase in text for phrase in bank)
            if not present:
                assert optional, (style, row, name, text)
                omitted[name] += 1
    assert all(omitted[name] > 20 for name in ("arrival", "injury", "mental")), omitted


def test_narrative_is_longer_than_shorthand_and_varied(rendered):
    narrative, shorthand = rendered["narrative"], rendered["shorthand"]
    assert np.mean([len(t) for t in narrative]) > 1.2 * np.mean([len(t) for t in shorthand])
    assert np.mean([t.count(". ") for t in narrative]) >= 3
    openings = Counter(t.split(" ")[1] for t in narrative)
    assert len(openings) > 10
    assert len({t[:12] for t in narrative}) > 300


def test_ko_has_hangul_and_keeps_the_latin_complaint(rendered, ktas):
    for row, text in enumerate(rendered["ko"]):
        assert HANGUL.search(text), text
        f = Facts.of(ktas.rendering.records[row])
        if f.complaint:
            assert f.complaint in text
    joined = "\n".join(rendered["ko"])
    for phrase in (
        "내원",
        "호소",
        "V/S",
        "도,",
        "SpO2",
        "의식 명료",
        "119",
        "자가용",
        "도보",
        "사설 구급차",
        "외상",
        "NRS",
    ):
        assert phrase in joined, phrase
    assert re.search(r"NRS \d+점", joined) and re.search(r"\d+세", joined) and "통증 없음" in joined
    assert any(re.search(r"\((복통|흉통|두통)\)", t) for t in rendered["ko"])  # sometimes a Korean gloss


def test_abbreviations_both_ways():
    assert expand_abbreviations("Lt. abd pain") == "left abdominal pain"
    assert expand_abbreviations("LBP") == "low back pain" and expand_abbreviations("SOB, N/V") == (
        "shortness of breath, nausea and vomiting"
    )
    assert abbreviate("left abdominal pain") == "Lt abd pain"
    assert abbreviate("right upper quadrant pain") == "RUQ pain"
    for short, long in ABBREVIATIONS:
        assert expand_abbreviations(short) == long
        assert abbreviate(long) == short
    seen = {vary_complaint("abd pain", random.Random(i)) for i in range(60)}
    assert {"abd pain", "abdominal pain"} <= seen
    seen = {vary_complaint("abdominal pain", random.Random(i)) for i in range(60)}
    assert {"abd pain", "abdominal pain"} <= seen
    seen = {vary_complaint("pain, chest", random.Random(i)) for i in range(60)}
    assert {"pain, chest", "chest pain", "CP"} <= seen
    seen = {vary_complaint("LBP - Low back pain", random.Random(i)) for i in range(60)}
    assert {"LBP", "Low back pain", "LBP - Low back pain"} <= seen
    assert korean_gloss("Abd. pain") == "복통" and korean_gloss("sorethroat") == "인후통"


def test_abbreviations_cover_the_frequent_complaints(frame):
    complaints = frame["Chief_complain"].str.strip().value_counts()
    frequent = [c for c in complaints.index[:60] if c and not set(c) <= set("? ")]
    covered = [c for c in frequent if expand_abbreviations(c) != c or abbreviate(c) != c]
    for term in ("abd pain", "Lt flank pain", "LBP - Low back pain", "HA", "DZ - Dizziness", "Rt. flank pain"):
        assert expand_abbreviations(term) != term
    assert len(covered) >= 15, covered


def test_lost_and_empty_complaints_are_skipped(ktas, rendered):
    lost = [r for r, rec in ktas.rendering.records.items() if not Facts.of(rec).complaint]
    assert lost == [r for r, text in enumerate(rendered["shorthand"]) if not text.startswith("CC: ")]
    assert 20 <= len(lost) <= 22  # 11 empty, 11 lost to "?" (one of which keeps a letter)
    for row in lost:
        for style in STYLES:
            assert "?" not in rendered[style][row] and "CC: ." not in rendered[style][row]


def test_mixed_draws_every_style_and_epoch_zero_is_a_fixed_draw(rendered, ktas):
    styles = Counter(mixed_style(0, r, 0) for r in range(len(ktas)))
    assert set(styles) == set(FIXED_STYLES) and min(styles.values()) > 300
    for row, text in enumerate(rendered["mixed"]):
        assert text == rendered[mixed_style(0, row, 0)][row]
    changed = sum(a != b for a, b in zip(rendered["mixed"], rendered["mixed-1"], strict=True))
    assert changed > 0.5 * len(ktas)


def test_split_is_made_on_records_and_never_crossed(tmp_path):
    shorthand = load_parts(DataArguments(data="ktas", split_seed=5), save_split=tmp_path / "split.json")
    reused = DataArguments(data="ktas", render="mixed", split_file=str(tmp_path / "split.json"))
    for args in (DataArguments(data="ktas", split_seed=5, render="narrative"), reused):
        parts = load_parts(args)
        ids = {name: set(part.row_ids.tolist()) for name, part in parts.items()}
        assert not (ids["train"] & ids["valid"] or ids["train"] & ids["test"] or ids["valid"] & ids["test"])
        for name, part in parts.items():
            assert part.row_ids.tolist() == shorthand[name].row_ids.tolist()
            assert part.texts != shorthand[name].texts
            assert part.rendering.style == args.render


def test_mixed_training_notes_are_redrawn_per_epoch_validation_fixed():
    parts = load_parts(DataArguments(data="ktas", render="mixed"))
    train = parts["train"]
    assert train.for_epoch(1).texts != train.for_epoch(2).texts
    assert train.for_epoch(1).texts == train.for_epoch(1).texts
    assert train.for_epoch(1).row_ids.tolist() == train.row_ids.tolist()
    fixed = load_parts(DataArguments(data="ktas", render="narrative"))["train"]
    assert fixed.for_epoch(3) is fixed
    assert parts["valid"].texts == load_parts(DataArguments(data="ktas", render="mixed"))["valid"].texts


def test_a_mixed_model_is_calibrated_on_every_validation_record_in_every_style():
    valid = load_parts(DataArguments(data="ktas", render="mixed"))["valid"]
    fitting = calibration_examples(valid)
    n = len(valid)
    assert len(fitting) == 3 * n
    assert fitting.row_ids.tolist() == valid.row_ids.tolist() * 3
    assert fitting.labels.tolist() == valid.labels.tolist() * 3
    for i, style in enumerate(FIXED_STYLES):
        assert fitting.texts[i * n : (i + 1) * n] == render_examples(valid, style).texts
    fixed = load_parts(DataArguments(data="ktas", render="ko"))["valid"]
    assert calibration_examples(fixed) is fixed


def test_render_options_are_checked():
    with pytest.raises(ConfigError, match="--render narrative re-renders KTAS records"):
        DataArguments(data="notes.csv", render="narrative")
    with pytest.raises(ConfigError, match="not one of"):
        DataArguments(data="ktas", render="poetry")
    DataArguments(data="other.csv", data_format="ktas", render="ko")
    with pytest.raises(ConfigError, match="--encoding: unknown encoding"):
        DataArguments(data="ktas", encoding="klingon")
    kd = TrainingArguments(method="mlkd"), ModelArguments(teacher="minilm-l6")
    with pytest.raises(ConfigError, match="--no-teacher-cache"):
        check_fit_options(DataArguments(render="mixed"), kd[1], kd[0], DistillArguments(), EvalArguments())
    check_fit_options(
        DataArguments(render="mixed"), kd[1], kd[0], DistillArguments(teacher_cache=False), EvalArguments()
    )
    check_fit_options(DataArguments(render="ko"), kd[1], kd[0], DistillArguments(), EvalArguments())
    # layer-kd caches nothing: its teacher runs on each epoch's notes
    layer_kd = TrainingArguments(method="layer-kd")
    check_fit_options(DataArguments(render="mixed"), kd[1], layer_kd, DistillArguments(), EvalArguments())


def test_render_of_a_table_is_refused(ktas):
    from dataclasses import replace

    with pytest.raises(DataError, match="--render needs KTAS records"):
        render_examples(replace(ktas, rendering=None), "ko")


def test_render_evaluation_has_its_own_directory(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.eval_dir(render="ko") == tmp_path / "eval-render-ko"
    assert run.predictions_file(render="narrative") == tmp_path / "eval-render-narrative" / "predictions.csv"
    assert run.eval_dir() == tmp_path / "eval"


def test_mixed_run_redraws_per_epoch_and_evaluates_per_rendering(tmp_path, tiny_bert_dir, monkeypatch):
    """End to end on the real records with the tiny fixture encoder: fit --render mixed, evaluate --render ko."""
    import json

    from typer.testing import CliRunner

    from training.cli import app
    from training.data.examples import Examples
    from training.fit import fit

    epochs_drawn = []
    for_epoch = Examples.for_epoch

    def spy(self, epoch):
        epochs_drawn.append(epoch)
        return for_epoch(self, epoch)

    monkeypatch.setattr(Examples, "for_epoch", spy)
    out = tmp_path / "mixed"
    fit(
        DataArguments(data="ktas", render="mixed", valid_fraction=0.1, test_fraction=0.8),  # 10% train: cheap
        ModelArguments(student=str(tiny_bert_dir), max_length=48),
        TrainingArguments(out=str(out), epochs=2, batch_size=64, patience=5),
        DistillArguments(),
        EvalArguments(bootstrap=10),
    )
    assert epochs_drawn == [1, 2]
    result = CliRunner().invoke(app, ["evaluate", "--run", str(out), "--render", "ko", "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval-render-ko" / "metrics.json").read_text())
    assert report["render"]["style"] == "ko" and "decision" not in report
    split = json.loads((out / "split.json").read_text())
    predictions = (out / "eval-render-ko" / "predictions.csv").read_text().splitlines()[1:]
    assert sorted(int(line.split(",")[0]) for line in predictions) == split["test"]
    assert "decision" in json.loads((out / "eval" / "metrics.json").read_text())
    result = CliRunner().invoke(app, ["evaluate", "--run", str(out), "--render", "ko", "--data", "x.csv"])
    assert result.exit_code == 2 and "does not go with --data" in result.output
