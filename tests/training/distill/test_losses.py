"""The vectorized word-level distillation loss against a plain per-note, per-word loop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, BertConfig

from training.config import ATTENTION_LOSSES, HIDDEN_LOSSES, ConfigError, DistillArguments
from training.distill.align import align_words
from training.distill.losses import (
    MultiLevelDistillLoss,
    TeacherWordFeatures,
    logit_distill_loss,
    pool_words,
    uniform_layer_map,
    word_attention,
)

# (student layers, width, heads), (teacher layers, width, heads), --layer-map
SHAPES = {
    "deeper-narrower-student": ((4, 16, 4), (2, 24, 2), None),
    "same-shape": ((3, 16, 4), (3, 16, 4), None),
    "explicit-map": ((2, 16, 2), (3, 8, 4), "1:3,2:2"),
}


def encoder_config(layers: int, width: int, heads: int) -> BertConfig:
    return BertConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads)


def random_word_index(words_per_note: list[int], tokens: int, generator: torch.Generator) -> torch.Tensor:
    """[B, T] word slots as an alignment makes them: every word has a token, other tokens are -1 or a word."""
    index = torch.full((len(words_per_note), tokens), -1)
    for row, words in zip(index, words_per_note, strict=True):
        positions = torch.randperm(tokens - 1, generator=generator) + 1
        row[positions[:words]] = torch.arange(words)
        if words:
            extra = positions[words:]
            row[extra] = torch.randint(-1, words, (len(extra),), generator=generator)
    return index


def random_encoder_outputs(batch: int, tokens: int, layers: int, width: int, heads: int, generator: torch.Generator):
    hidden_states = [torch.randn(batch, tokens, width, generator=generator) for _ in range(layers + 1)]
    attentions = [torch.randn(batch, heads, tokens, tokens, generator=generator).softmax(-1) for _ in range(layers)]
    return hidden_states, attentions


def reference_loss(
    student, teacher, student_index, teacher_index, word_mask, layer_map, projections, options, average_heads
):
    """The loss, looped: for each note, for each word, pool both models' layers, compare."""
    hidden_total = attention_total = 0.0
    student_hidden, student_attentions = student
    teacher_hidden, teacher_attentions = teacher
    for b in range(word_mask.shape[0]):
        words = int(word_mask[b].sum())
        student_tokens = [(student_index[b] == w).nonzero().flatten() for w in range(words)]
        teacher_tokens = [(teacher_index[b] == w).nonzero().flatten() for w in range(words)]
        for w in range(words):
            hidden_loss = attention_loss = 0.0
            for layer, (s, t) in enumerate(layer_map):
                s_vecs = [student_hidden[s][b, tokens].mean(0) for tokens in student_tokens]
                t_vecs = [teacher_hidden[t][b, tokens].mean(0) for tokens in teacher_tokens]
                if options.hidden_loss == "relation":
                    s_relations = torch.stack([F.cosine_similarity(s_vecs[w], v, dim=0) for v in s_vecs])
                    t_relations = torch.stack([F.cosine_similarity(t_vecs[w], v, dim=0) for v in t_vecs])
                    hidden_loss += ((s_relations - t_relations) ** 2).mean()
                elif options.hidden_loss == "mse":
                    hidden_loss += ((projections[layer](s_vecs[w]) - t_vecs[w]) ** 2).mean()
                else:
                    hidden_loss += 1 - F.cosine_similarity(projections[layer](s_vecs[w]), t_vecs[w], dim=0)
                s_att, t_att = student_attentions[s - 1][b], teacher_attentions[t - 1][b]
                if average_heads:
                    s_att, t_att = s_att.mean(0, keepdim=True), t_att.mean(0, keepdim=True)
                s_row = torch.stack(
                    [s_att[:, student_tokens[w]][:, :, student_tokens[v]].sum(-1).mean(-1) for v in range(words)], -1
                )
                t_row = torch.stack(
                    [t_att[:, teacher_tokens[w]][:, :, teacher_tokens[v]].sum(-1).mean(-1) for v in range(words)], -1
                )
                p_s, p_t = s_row / s_row.sum(-1, keepdim=True), t_row / t_row.sum(-1, keepdim=True)
                if options.attention_loss == "mse":
                    attention_loss += ((p_s - p_t) ** 2).mean()
                else:
                    attention_loss += (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
            hidden_total += hidden_loss / len(layer_map)
            attention_total += attention_loss / len(layer_map)
    aligned = max(int(word_mask.sum()), 1)
    hidden, attention = hidden_total / aligned, attention_total / aligned
    return options.alpha * hidden + options.beta * attention, hidden, attention


def make_case(
    shape: str,
    hidden_loss: str,
    attention_loss: str,
    words_per_note: list[int],
    seed: int = 0,
    attention_heads: str = "mean",
):
    generator = torch.Generator().manual_seed(seed)
    (s_layers, s_width, s_heads), (t_layers, t_width, t_heads), layer_map = SHAPES[shape]
    options = DistillArguments(
        hidden_loss=hidden_loss, attention_loss=attention_loss, attention_heads=attention_heads, layer_map=layer_map
    )
    torch.manual_seed(seed)
    loss = MultiLevelDistillLoss(
        encoder_config(s_layers, s_width, s_heads), encoder_config(t_layers, t_width, t_heads), options
    )
    batch, s_tokens, t_tokens = len(words_per_note), 12, 9
    student = random_encoder_outputs(batch, s_tokens, s_layers, s_width, s_heads, generator)
    teacher = random_encoder_outputs(batch, t_tokens, t_layers, t_width, t_heads, generator)
    for tensor in [*student[0], *student[1]]:
        tensor.requires_grad_()
    num_words = max(words_per_note)
    return SimpleNamespace(
        loss=loss,
        options=options,
        student=student,
        teacher=teacher,
        student_index=random_word_index(words_per_note, s_tokens, generator),
        teacher_index=random_word_index(words_per_note, t_tokens, generator),
        word_mask=torch.arange(num_words) < torch.tensor(words_per_note)[:, None],
        num_words=num_words,
    )


def teacher_features(case):
    teacher_outputs = SimpleNamespace(hidden_states=case.teacher[0], attentions=case.teacher[1])
    return case.loss.teacher_word_features(teacher_outputs, case.teacher_index, case.num_words)


def run(case, normalizer=None, features=None):
    features = features or teacher_features(case)
    return case.loss(case.student[0], case.student[1], case.student_index, case.word_mask, features, normalizer)


def reference_loss_of(case):
    """`reference_loss` on a case's tensors and the vectorized loss's own layer map, projection and options."""
    return reference_loss(
        case.student,
        case.teacher,
        case.student_index,
        case.teacher_index,
        case.word_mask,
        case.loss.layer_map,
        case.loss.projections,
        case.options,
        case.loss.average_heads,
    )


@pytest.mark.parametrize(("shape", "attention_heads"), [*((s, "mean") for s in SHAPES), ("same-shape", "by-index")])
@pytest.mark.parametrize("hidden_loss", HIDDEN_LOSSES)
@pytest.mark.parametrize("attention_loss", ATTENTION_LOSSES)
def test_loss_matches_the_per_word_loop(shape, attention_heads, hidden_loss, attention_loss):
    case = make_case(shape, hidden_loss, attention_loss, [3, 1, 0, 4], attention_heads=attention_heads)
    output = run(case)
    expected_total, expected_hidden, expected_attention = reference_loss_of(case)
    assert output.num_words == 8
    torch.testing.assert_close(output.hidden, expected_hidden.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.attention, expected_attention.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.total, expected_total, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden_loss", HIDDEN_LOSSES)
@pytest.mark.parametrize("attention_loss", ATTENTION_LOSSES)
def test_gradients_match_the_loop_and_reach_only_the_student(hidden_loss, attention_loss):
    case = make_case("deeper-narrower-student", hidden_loss, attention_loss, words_per_note=[2, 0, 3])
    run(case).total.backward()
    vectorized = [t.grad.clone() for t in [*case.student[0], *case.student[1]] if t.grad is not None]
    projection_grads = [p.grad.clone() for p in case.loss.parameters()]
    assert all(g.abs().sum() > 0 for g in projection_grads)
    assert all(g.isfinite().all() for g in vectorized)

    for tensor in [*case.student[0], *case.student[1], *case.loss.parameters()]:
        tensor.grad = None
    reference_loss_of(case)[0].backward()
    looped = [t.grad for t in [*case.student[0], *case.student[1]] if t.grad is not None]
    assert len(looped) == len(vectorized) == 2 * len(case.loss.layer_map)
    for got, want in zip(vectorized, looped, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for parameter, want in zip(case.loss.parameters(), projection_grads, strict=True):
        torch.testing.assert_close(parameter.grad, want, rtol=1e-4, atol=1e-6)


def test_teacher_features_get_no_gradient():
    case = make_case("same-shape", "mse", "kl", words_per_note=[2, 3])
    features = TeacherWordFeatures(
        hidden=torch.randn(3, 2, 3, 16, requires_grad=True), attention=torch.rand(3, 2, 1, 3, 3, requires_grad=True)
    )
    case.loss(case.student[0], case.student[1], case.student_index, case.word_mask, features).total.backward()
    assert features.hidden.grad is None and features.attention.grad is None
    assert case.student[0][-1].grad.abs().sum() > 0


@pytest.mark.parametrize("hidden_loss", HIDDEN_LOSSES)
@pytest.mark.parametrize("attention_loss", ATTENTION_LOSSES)
def test_a_batch_without_aligned_words_costs_exactly_zero(hidden_loss, attention_loss):
    case = make_case("deeper-narrower-student", hidden_loss, attention_loss, words_per_note=[0, 0])
    output = run(case)
    assert output.num_words == 0
    assert output.total.item() == 0 and output.hidden.item() == 0 and output.attention.item() == 0
    assert output.total.requires_grad
    output.total.backward()
    assert all(t.grad is None or (t.grad == 0).all() for t in [*case.student[0], *case.student[1]])


@pytest.mark.parametrize("hidden_loss", HIDDEN_LOSSES)
@pytest.mark.parametrize("attention_loss", ATTENTION_LOSSES)
def test_padded_word_slots_never_contribute(hidden_loss, attention_loss):
    words_per_note = [3, 1, 0, 4]
    case = make_case("deeper-narrower-student", hidden_loss, attention_loss, words_per_note)
    clean = teacher_features(case)
    garbage = TeacherWordFeatures(clean.hidden.clone(), clean.attention.clone(), clean.relation)
    for b, words in enumerate(words_per_note):
        garbage.hidden[:, b, words:] = 7.0
        garbage.attention[:, b, :, words:] = 7.0
        garbage.attention[:, b, :, :, words:] = 7.0
        if clean.relation:
            garbage.hidden[:, b, :, words:] = 7.0
    want = run(case, features=clean)
    got = run(case, features=garbage)
    torch.testing.assert_close(got.total, want.total)
    assert got.total > 0


def test_normalizer_spreads_the_loss_over_the_accumulated_batch():
    case = make_case("same-shape", "mse", "mse", words_per_note=[2, 1])
    own = run(case)
    accumulated = run(case, normalizer=4 * own.num_words)
    torch.testing.assert_close(accumulated.total, own.total / 4)
    assert accumulated.num_words == own.num_words == 3


@pytest.mark.parametrize("hidden_loss", ["mse", "cosine"])
def test_every_mapped_layer_has_its_own_trained_projection_even_at_equal_widths(hidden_loss):
    case = make_case("same-shape", hidden_loss, "kl", words_per_note=[2, 3])
    assert len(case.loss.projections) == len(case.loss.layer_map) == 3
    assert all(isinstance(p, torch.nn.Linear) and p.weight.shape == (16, 16) for p in case.loss.projections)
    run(case).total.backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in case.loss.projections)


def relation_loss(student_width: int, student_states) -> torch.Tensor:
    """The relation loss of a student whose token states are `student_states(teacher's)`, tokens laid out alike."""
    generator = torch.Generator().manual_seed(4)
    teacher_config, student_config = encoder_config(2, 16, 4), encoder_config(2, student_width, 4)
    loss = MultiLevelDistillLoss(student_config, teacher_config, DistillArguments(hidden_loss="relation"))
    assert len(loss.projections) == 0 and not list(loss.parameters())
    index = random_word_index([3, 4], tokens=10, generator=generator)
    hidden_states, attentions = random_encoder_outputs(2, 10, 2, 16, 4, generator)
    teacher = SimpleNamespace(hidden_states=hidden_states, attentions=attentions)
    features = loss.teacher_word_features(teacher, index, num_words=4)
    assert features.relation and features.hidden.shape == (2, 2, 4, 4)
    word_mask = torch.arange(4) < torch.tensor([[3], [4]])
    student = [student_states(h) for h in hidden_states]
    return loss(student, attentions, index, word_mask, features).hidden


def test_relation_loss_ignores_the_students_coordinates_and_width():
    generator = torch.Generator().manual_seed(5)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=generator)).Q
    embedding = torch.linalg.qr(torch.randn(24, 24, generator=generator)).Q[:16]  # orthonormal rows: 16 -> 24 wide
    assert relation_loss(16, lambda h: 3 * h @ rotation) == pytest.approx(0, abs=1e-6)
    assert relation_loss(24, lambda h: 0.5 * h @ embedding) == pytest.approx(0, abs=1e-6)
    assert relation_loss(24, lambda h: torch.randn(*h.shape[:-1], 24)) > 0.01
    assert relation_loss(16, lambda h: h + torch.randn(h.shape)) > 0.01


@pytest.mark.parametrize("attention_heads", ["mean", "by-index"])
def test_only_by_index_tells_the_teachers_heads_apart(attention_heads):
    case = make_case("same-shape", "mse", "kl", words_per_note=[3, 2], attention_heads=attention_heads)
    before = run(case).attention
    case.teacher = (case.teacher[0], [a[:, [2, 0, 3, 1]] for a in case.teacher[1]])
    after = run(case).attention
    if attention_heads == "mean":
        torch.testing.assert_close(after, before)
    else:
        assert not torch.allclose(after, before)


@pytest.mark.parametrize("attention_loss", ATTENTION_LOSSES)
def test_attention_compares_shares_among_the_aligned_words_not_raw_mass(attention_loss):
    generator = torch.Generator().manual_seed(6)
    config = encoder_config(2, 16, 4)
    loss = MultiLevelDistillLoss(config, config, DistillArguments(attention_loss=attention_loss))
    index = random_word_index([3, 2], tokens=8, generator=generator)  # token 0 is in no word
    hidden_states, teacher_attentions = random_encoder_outputs(2, 8, 2, 16, 4, generator)
    student_attentions = []
    for attention in teacher_attentions:  # half of the attention paid to words goes to token 0 instead
        halved = torch.where((index >= 0)[:, None, None, :], attention / 2, attention)
        halved[..., 0] += (attention - halved).sum(-1)
        student_attentions.append(halved)
    torch.testing.assert_close(
        word_attention(student_attentions[0], index, 3), word_attention(teacher_attentions[0], index, 3) / 2
    )
    teacher = SimpleNamespace(hidden_states=hidden_states, attentions=teacher_attentions)
    features = loss.teacher_word_features(teacher, index, num_words=3)
    word_mask = torch.arange(3) < torch.tensor([[3], [2]])
    output = loss(hidden_states, student_attentions, index, word_mask, features)
    assert output.attention.item() == pytest.approx(0, abs=1e-6)


def test_pooling_a_stack_of_layers_pools_each_layer():
    generator = torch.Generator().manual_seed(1)
    index = random_word_index([2, 3], tokens=7, generator=generator)
    layers = torch.randn(4, 2, 7, 5, generator=generator)
    pooled = pool_words(layers, index, num_words=3)
    assert pooled.shape == (4, 2, 3, 5)
    for layer in range(4):
        torch.testing.assert_close(pooled[layer], pool_words(layers[layer], index, num_words=3))
    torch.testing.assert_close(pooled[:, 1, 2], layers[:, 1][:, index[1] == 2].mean(1))
    assert (pooled[:, 0, 2] == 0).all()  # note 0 has two words: slot 2 is empty


def test_word_rows_hold_the_attention_paid_to_aligned_words():
    generator = torch.Generator().manual_seed(2)
    index = random_word_index([3], tokens=8, generator=generator)
    attention = torch.randn(1, 2, 8, 8, generator=generator).softmax(-1)
    words = word_attention(attention, index, num_words=3)
    in_word = index[0] >= 0
    for w in range(3):
        paid = attention[0][:, index[0] == w][:, :, in_word].sum(-1).mean(-1)
        torch.testing.assert_close(words[0, :, w].sum(-1), paid)


def test_uniform_layer_map():
    assert uniform_layer_map(12, 6) == [(2, 1), (4, 2), (6, 3), (8, 4), (10, 5), (12, 6)]
    assert uniform_layer_map(6, 12) == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]
    assert uniform_layer_map(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]


def test_bad_configuration_is_named():
    student, teacher = encoder_config(2, 16, 4), encoder_config(3, 16, 4)
    with pytest.raises(ConfigError, match=r"--layer-map pair 3:1 is outside 1\.\.2"):
        MultiLevelDistillLoss(student, teacher, DistillArguments(layer_map="3:1"))
    with pytest.raises(ConfigError, match="--hidden-loss: 'l1' is not one of 'mse', 'cosine', 'relation'"):
        DistillArguments(hidden_loss="l1")
    with pytest.raises(ConfigError, match="--attention-heads: 'all' is not one of 'mean', 'by-index'"):
        DistillArguments(attention_heads="all")
    with pytest.raises(ConfigError, match=r"--attention-heads by-index .* got 4 \(student\) and 2 \(teacher\)"):
        MultiLevelDistillLoss(student, encoder_config(3, 16, 2), DistillArguments(attention_heads="by-index"))
    loss = MultiLevelDistillLoss(student, teacher)
    case = make_case("same-shape", "mse", "mse", words_per_note=[2, 1])
    by_index = TeacherWordFeatures(hidden=torch.zeros(3, 2, 2, 16), attention=torch.zeros(3, 2, 4, 2, 2))
    with pytest.raises(ValueError, match=r"not \[3 mapped layers, 2 notes, 1 heads, 2 words, 2 words\]"):
        case.loss(case.student[0], case.student[1], case.student_index, case.word_mask, by_index)
    relations = TeacherWordFeatures(torch.zeros(3, 2, 2, 2), torch.zeros(3, 2, 1, 2, 2), relation=True)
    with pytest.raises(ValueError, match="relation=True do not fit --hidden-loss mse"):
        case.loss(case.student[0], case.student[1], case.student_index, case.word_mask, relations)
    with pytest.raises(ValueError, match="output_attentions=True"):
        loss.teacher_word_features(SimpleNamespace(hidden_states=[], attentions=None), torch.zeros(1, 3).long(), 1)


def test_logit_distillation():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(4, 2, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 2, generator=generator, requires_grad=True)
    loss = logit_distill_loss(student, teacher, temperature=2.0)
    p_teacher, p_student = (teacher / 2).softmax(-1), (student / 2).softmax(-1)
    expected = 4 * (p_teacher * (p_teacher.log() - p_student.log())).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert logit_distill_loss(teacher, teacher, temperature=3.0).item() == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize("hidden_loss", HIDDEN_LOSSES)
def test_losses_are_computed_in_fp32_under_bf16_autocast(hidden_loss):
    """`fit --precision bf16` runs the models under autocast: the losses must still be computed in fp32 from
    the bf16 outputs. Equal to the bit to the same computation on those outputs cast to fp32 outside autocast;
    computed in bf16, the word pooling and renormalisation would round differently."""
    case = make_case("deeper-narrower-student", hidden_loss, "kl", [3, 5, 2])
    as_bf16 = [[tensor.detach().bfloat16() for tensor in outputs] for outputs in (*case.student, *case.teacher)]
    as_fp32 = [[tensor.float() for tensor in outputs] for outputs in as_bf16]

    def losses(student_hidden, student_attentions, teacher_hidden, teacher_attentions):
        teacher_outputs = SimpleNamespace(hidden_states=teacher_hidden, attentions=teacher_attentions)
        features = case.loss.teacher_word_features(teacher_outputs, case.teacher_index, case.num_words)
        out = case.loss(student_hidden, student_attentions, case.student_index, case.word_mask, features)
        logits = logit_distill_loss(student_hidden[-1][:, 0, :2], teacher_hidden[-1][:, 0, :2], temperature=2.0)
        return [features.hidden, features.attention, out.total, out.hidden, out.attention, logits]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = losses(*as_bf16)
    reference = losses(*as_fp32)
    for computed, expected in zip(under_autocast, reference, strict=True):
        assert computed.dtype == torch.float32
        assert torch.equal(computed, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the loss would be if autocast reached it
        rounded = pool_words(as_bf16[0][1], case.student_index, case.num_words)
    assert rounded.dtype == torch.bfloat16


def test_real_tiny_models_train_the_student_only(tiny_bert_dir, tiny_teacher_dir, notes):
    texts = [text for text, _ in notes[:4]]
    student_tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    teacher_tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    student = AutoModel.from_pretrained(tiny_bert_dir, attn_implementation="eager")
    teacher = AutoModel.from_pretrained(tiny_teacher_dir, attn_implementation="eager").eval()
    student_inputs = student_tokenizer(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")
    teacher_inputs = teacher_tokenizer(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")
    alignment = align_words(texts, student_inputs.pop("offset_mapping"), teacher_inputs.pop("offset_mapping"))
    assert alignment.num_words > 0

    loss = MultiLevelDistillLoss(student.config, teacher.config)
    assert loss.layer_map == [(1, 1), (2, 3)] and loss.average_heads
    teacher_outputs = teacher(**teacher_inputs, output_hidden_states=True, output_attentions=True)
    features = loss.teacher_word_features(teacher_outputs, alignment.teacher_word_index, alignment.num_words)
    assert features.hidden.shape == (2, 4, alignment.num_words, 48)
    assert features.attention.shape == (2, 4, 1, alignment.num_words, alignment.num_words)
    row_sums = features.attention[:, :, 0].sum(-1)[:, alignment.word_mask]
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums))

    student_outputs = student(**student_inputs, output_hidden_states=True, output_attentions=True)
    output = loss(
        student_outputs.hidden_states,
        student_outputs.attentions,
        alignment.student_word_index,
        alignment.word_mask,
        features,
    )
    output.total.backward()
    assert output.total.item() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert student.encoder.layer[-1].attention.self.query.weight.grad.abs().sum() > 0
    assert all(projection.weight.grad.abs().sum() > 0 for projection in loss.projections)
