"""Explanations by word occlusion (`explain: true` on /classify). Notes are SYNTHETIC, except in the faithfulness
test: it reads REAL KTAS test notes (the public, de-identified records under data/ktas) with a model fine-tuned
on the KTAS training notes."""

import logging

import numpy as np
import pytest

from app.bundle import load_bundle
from app.explain import Word, note_words, top_contributions, without
from app.inference import NoteClassifier
from app.logs import JsonFormatter
from app.settings import Settings
from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.data.loading import load_parts
from training.export import export_bundle
from training.fit import fit

EMERGENCY = "3세 남아 보호자 동반 CC: seizure. BT 39.1, HR 150"
ROUTINE = "CC: medication refill. BT 36.5"
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def ktas_bundle_dir(tmp_path_factory, tiny_bert_dir):
    """The tiny fixture BERT fine-tuned on the KTAS training notes: AUROC about 0.76 on the KTAS test notes."""
    root = tmp_path_factory.mktemp("ktas-bundle")
    run = fit(
        DataArguments(data="ktas"),
        ModelArguments(student=str(tiny_bert_dir), max_length=128),
        TrainingArguments(out=str(root / "run"), epochs=3, batch_size=16, encoder_lr=2e-3, head_lr=5e-3, seed=1),
        DistillArguments(),
        EvalArguments(bootstrap=20),
    )
    return export_bundle(run, root / "bundle", tolerance=1.0)


@pytest.fixture
def model_runs(monkeypatch):
    """The number of notes in each model run, as the batcher calls `NoteClassifier.predict`."""
    sizes: list[int] = []
    predict = NoteClassifier.predict

    def counted(self, token_ids):
        sizes.append(len(token_ids))
        return predict(self, token_ids)

    monkeypatch.setattr(NoteClassifier, "predict", counted)
    return sizes


def deleted(text: str, words: list[Word]) -> str:
    """The note with all these words deleted (the last first, so that the earlier offsets still hold)."""
    for word in sorted(words, key=lambda word: word.start, reverse=True):
        text = without(text, word)
    return text


def test_words_are_whitespace_tokens_trimmed_to_their_letters_and_digits():
    text = "CC: chest pain. BT 38.9, HR 150 (+) -- 3세 남아 SpO2 98% BP 137/75"
    words = note_words(text)
    expected = ["CC", "chest", "pain", "BT", "38.9", "HR", "150", "3세", "남아", "SpO2", "98", "BP", "137/75"]
    assert [word.text for word in words] == expected
    assert all(text[word.start : word.end] == word.text for word in words)
    assert without(text, words[1]) == "CC:  pain. BT 38.9, HR 150 (+) -- 3세 남아 SpO2 98% BP 137/75"
    assert note_words("- (+) ... —") == []
    assert note_words(text, at_most=2) == words[:2]


def test_the_top_words_are_those_of_largest_contribution_either_sign_ties_in_note_order():
    words = note_words("a b c d")
    top = top_contributions(words, np.array([0.1, -0.3, 0.1, 0.0], dtype=np.float32), top_k=3)
    assert [(item.word.text, round(item.contribution, 6)) for item in top] == [("b", -0.3), ("a", 0.1), ("c", 0.1)]


@pytest.mark.anyio
async def test_without_explain_there_is_no_explanation_and_the_same_probability(serve, settings):
    async with serve(settings()) as client:
        plain = (await client.post("/classify", json={"notes": [{"text": EMERGENCY}]})).json()["results"][0]
        off = (await client.post("/classify", json={"text": EMERGENCY, "explain": False})).json()["results"][0]
        explained = (await client.post("/classify", json={"text": EMERGENCY, "explain": True})).json()["results"][0]
        per_note = await client.post("/classify", json={"notes": [{"text": EMERGENCY, "explain": True}]})
    assert "explanation" not in plain and "explanation" not in off
    assert len(explained["explanation"]) == 5  # TRIAGE_EXPLAIN_TOP_K's default
    assert explained["probability"] == pytest.approx(plain["probability"], abs=1e-5)
    assert per_note.status_code == 422  # explain belongs to the request, not to a note of it


@pytest.mark.anyio
async def test_a_contribution_is_p_of_the_note_minus_p_without_the_word(serve, settings, tiny_bundle_dir):
    classifier = NoteClassifier.from_bundle(load_bundle(tiny_bundle_dir))
    async with serve(settings(explain_top_k=100)) as client:
        response = await client.post(
            "/classify", json={"notes": [{"text": EMERGENCY}, {"text": ROUTINE}], "explain": True}
        )
    assert response.status_code == 200
    for text, result in zip([EMERGENCY, ROUTINE], response.json()["results"], strict=True):
        explanation = result["explanation"]
        words = [Word(item["word"], item["start"], item["end"]) for item in explanation]
        assert sorted(words, key=lambda word: word.start) == note_words(text)  # every word, once
        expected = result["probability"] - classifier.predict_proba([without(text, word) for word in words])
        np.testing.assert_allclose([item["contribution"] for item in explanation], expected, atol=1e-5)
        sizes = [abs(item["contribution"]) for item in explanation]
        assert sizes == sorted(sizes, reverse=True)


@pytest.mark.anyio
async def test_the_same_note_gets_the_same_explanation(serve, settings):
    async with serve(settings()) as client:
        first, second = [
            (await client.post("/classify", json={"text": EMERGENCY, "explain": True})).json() for _ in range(2)
        ]
    assert first == second


@pytest.mark.anyio
async def test_a_note_and_its_variants_run_in_one_batch(serve, settings, model_runs):
    async with serve(settings()) as client:
        model_runs.clear()  # the warm-up
        response = await client.post("/classify", json={"text": EMERGENCY, "explain": True})
    assert response.status_code == 200
    assert model_runs == [1 + len(note_words(EMERGENCY))]


@pytest.mark.anyio
async def test_a_one_word_note_is_compared_with_the_empty_note(serve, settings, tiny_bundle_dir):
    classifier = NoteClassifier.from_bundle(load_bundle(tiny_bundle_dir))
    async with serve(settings()) as client:
        [result] = (await client.post("/classify", json={"text": "seizure", "explain": True})).json()["results"]
    [item] = result["explanation"]
    assert (item["word"], item["start"], item["end"]) == ("seizure", 0, 7)
    assert item["contribution"] == pytest.approx(
        float(np.subtract(*classifier.predict_proba(["seizure", ""]))), abs=1e-5
    )


@pytest.mark.anyio
async def test_a_note_without_words_gets_an_empty_explanation(serve, settings, model_runs):
    async with serve(settings()) as client:
        model_runs.clear()
        response = await client.post("/classify", json={"text": "- (+) ... —", "explain": True})
    [result] = response.json()["results"]
    assert result["explanation"] == [] and 0 <= result["probability"] <= 1
    assert model_runs == [1]


@pytest.mark.anyio
async def test_explain_max_words_counts_the_words_of_the_whole_request(serve, settings):
    three, four = "CC: chest pain", "BT 39.1, HR 150"
    async with serve(settings(explain_max_words=7, explain_top_k=2)) as client:
        at_the_cap = await client.post("/classify", json={"notes": [{"text": three}, {"text": four}], "explain": True})
        over = await client.post("/classify", json={"notes": [{"text": three}, {"text": four}] * 2, "explain": True})
        unexplained = await client.post("/classify", json={"notes": [{"text": three}, {"text": four}] * 2})
    assert at_the_cap.status_code == 200
    assert [len(result["explanation"]) for result in at_the_cap.json()["results"]] == [2, 2]
    assert over.status_code == 413 and "more than 7 words (explain_max_words)" in over.json()["detail"]
    assert unexplained.status_code == 200


@pytest.mark.anyio
async def test_explained_words_reach_the_answer_but_never_the_logs(serve, settings, caplog, capsys):
    marker = "ZQX-EXPLAIN-5120"
    caplog.set_level(logging.DEBUG)
    async with serve(settings(explain_top_k=100)) as client:
        response = await client.post("/classify", json={"text": f"CC: seizure {marker}", "explain": True})
    assert marker in {item["word"] for item in response.json()["results"][0]["explanation"]}
    [access] = [record for record in caplog.records if record.name == "app.access"]
    assert access.fields["explained_words"] == 3
    formatted = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    captured = capsys.readouterr()
    assert marker not in formatted + caplog.text + captured.out + captured.err


@pytest.mark.anyio
async def test_deleting_the_top_words_moves_p_more_than_deleting_random_words_on_real_ktas_notes(
    serve, ktas_bundle_dir
):
    """Deletion curves over the first 20 KTAS test notes: deleting the k words of largest contribution lowers
    P(emergency) more than deleting k random words, and deleting the k of most negative contribution raises it
    more, for every k from 1 to 5 (averaged over notes and 20 random draws per note and k). For k = 1 it follows
    from the definition; beyond it, it says that one-word contributions predict what deleting several does."""
    texts = list(load_parts(DataArguments(data="ktas"))["test"].texts)[:20]
    classifier = NoteClassifier.from_bundle(load_bundle(ktas_bundle_dir, variant="fp32", providers=CPU))
    async with serve(Settings(bundle=ktas_bundle_dir, variant="fp32", explain_top_k=100)) as client:
        results = [(await client.post("/classify", json={"text": text, "explain": True})).json() for text in texts]
    rng = np.random.default_rng(0)
    ks, draws = range(1, 6), 20
    top_first, bottom_first, random = [], [], []
    for text, result in zip(texts, results, strict=True):
        ranked = sorted(result["results"][0]["explanation"], key=lambda item: item["contribution"], reverse=True)
        words = [Word(item["word"], item["start"], item["end"]) for item in ranked]
        top_first.append(classifier.predict_proba([deleted(text, words[:k]) for k in ks]))
        bottom_first.append(classifier.predict_proba([deleted(text, words[::-1][:k]) for k in ks]))
        drawn = [
            deleted(text, [words[i] for i in rng.choice(len(words), k, replace=False)])
            for k in ks
            for _ in range(draws)
        ]
        random.append(classifier.predict_proba(drawn).reshape(len(ks), draws).mean(axis=1))
    top_curve, bottom_curve, random_curve = (np.mean(curves, axis=0) for curves in (top_first, bottom_first, random))
    assert (top_curve < random_curve - 0.05).all(), (top_curve, random_curve)
    assert (bottom_curve > random_curve + 0.03).all(), (bottom_curve, random_curve)
