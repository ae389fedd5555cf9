"""Resumable `fit`: a run stopped mid-epoch and resumed is the run that was never stopped (SYNTHETIC notes)."""

import json
from dataclasses import replace

import pytest
import torch

from tests.training.distill.test_layers import save_classifier
from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.errors import ConfigError, RunDirectoryError
from training.fit import fit
from training.run_dir import RunDirectory

# 140 training notes in batches of 16: 9 steps an epoch, 27 in all. A state is saved every 4 steps and at
# each epoch's end; the stop comes during step 15, the 6th of epoch 2, after the state of step 12.
STOP_DURING_STEP = 15


class Stopped(Exception):
    """Stands for the process being killed: raised in the middle of an optimizer step."""


def options(out, notes_csv, student, teacher=None, method="base", teacher_cache=True, **training):
    return (
        DataArguments(data=str(notes_csv)),
        ModelArguments(student=str(student), teacher=teacher and str(teacher), max_length=64),
        TrainingArguments(
            **{
                "out": str(out),
                "method": method,
                "epochs": 3,
                "batch_size": 16,
                "encoder_lr": 2e-3,
                "head_lr": 5e-3,
                "patience": 3,
                "seed": 1,
                "checkpoint_steps": 4,
                "threads": 1,
                **training,
            }
        ),
        DistillArguments(
            word_policy="all",
            teacher_max_length=16,
            teacher_cache=teacher_cache,
            teacher_cache_dir=str(out.parent / "teacher-cache"),
        ),
        EvalArguments(bootstrap=10),
    )


def stop_during_step(monkeypatch, step):
    """Make the optimizer raise `Stopped` in its `step`-th step, after updating the weights: before the run
    counts the step, as a kill would land."""

    class StoppingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            loss = super().step(closure)
            self.steps = getattr(self, "steps", 0) + 1
            if self.steps == step:
                raise Stopped
            return loss

    monkeypatch.setattr(torch.optim, "AdamW", StoppingAdamW)


def history(out):
    """history.jsonl without the wall-clock times."""
    lines = RunDirectory(out).history_file.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines]


@pytest.mark.parametrize(
    ("method", "teacher_cache"),
    [("base", True), ("mlkd", True), ("ensemble", False)],
    ids=["base", "mlkd-teacher-cache", "ensemble-live-teacher"],
)
def test_a_run_stopped_mid_epoch_and_resumed_is_the_uninterrupted_run(
    tmp_path, monkeypatch, notes_csv, tiny_bert_dir, tiny_teacher_dir, method, teacher_cache
):
    def run(name, **training):
        teacher = None if method == "base" else tiny_teacher_dir
        fit(*options(tmp_path / name, notes_csv, tiny_bert_dir, teacher, method, teacher_cache, **training))

    run("uninterrupted")
    with monkeypatch.context() as patch:
        stop_during_step(patch, STOP_DURING_STEP)
        with pytest.raises(Stopped):
            run("stopped")
    stopped = RunDirectory(tmp_path / "stopped")
    state = torch.load(stopped.resume_file, weights_only=True)
    assert (state["progress"]["epoch"], state["progress"]["epoch_steps"], state["progress"]["step"]) == (2, 3, 12)
    assert len(history(stopped.root)) == 1  # epoch 1 only

    run("stopped", resume=True)
    assert history(stopped.root) == history(tmp_path / "uninterrupted")  # exactly: same steps on the same CPU
    assert len(history(stopped.root)) == 3
    assert not stopped.resume_file.exists()  # removed once the run is complete
    uninterrupted = json.loads(RunDirectory(tmp_path / "uninterrupted").metrics_file().read_text())
    assert json.loads(stopped.metrics_file().read_text())["threshold_free"] == uninterrupted["threshold_free"]
    if method != "base" and teacher_cache:  # the cache was built once and reused by the second session
        assert len(list((tmp_path / "teacher-cache").iterdir())) == 1


def test_a_quantization_aware_layer_kd_run_stopped_and_resumed_is_the_uninterrupted_run(
    tmp_path, monkeypatch, notes_csv, tiny_bert_dir
):
    """The activation ranges are in the saved state: the resumed epoch goes on with those it started with."""
    classifier = save_classifier(tiny_bert_dir, tmp_path / "classifier")

    def run(name, **training):
        data, model, train, distill, evaluation = options(
            tmp_path / name, notes_csv, classifier, classifier, "layer-kd", quantization_aware=True, **training
        )
        fit(data, replace(model, student_layers=1), train, distill, evaluation)

    run("uninterrupted")
    with monkeypatch.context() as patch:
        stop_during_step(patch, STOP_DURING_STEP)
        with pytest.raises(Stopped):
            run("stopped")
    run("stopped", resume=True)
    assert history(tmp_path / "stopped") == history(tmp_path / "uninterrupted")
    assert len(history(tmp_path / "stopped")) == 3


def test_best_checkpoints_written_after_the_saved_state_are_written_again(
    tmp_path, monkeypatch, notes_csv, tiny_bert_dir
):
    """Stopped after epoch 2's validation saved its checkpoint, before the end-of-epoch state was written: the
    resumed run starts from step 16 (epoch 2), drops that checkpoint and comes to the same ones."""
    fit(*options(tmp_path / "uninterrupted", notes_csv, tiny_bert_dir))
    import training.fit

    save_state, saves = training.fit.save_state, []

    def save_or_stop(*args, **kwargs):
        saves.append(args[-2].step)  # the progress
        if saves == [4, 8, 9, 12, 16, 18]:  # 9 and 18: the ends of epochs 1 and 2
            raise Stopped
        save_state(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(training.fit, "save_state", save_or_stop)
        with pytest.raises(Stopped):
            fit(*options(tmp_path / "run", notes_csv, tiny_bert_dir))
    run = RunDirectory(tmp_path / "run")
    assert len(history(run.root)) == 2 and run.epoch_checkpoint(2).is_dir()
    assert torch.load(run.resume_file, weights_only=True)["progress"]["step"] == 16

    fit(*options(tmp_path / "run", notes_csv, tiny_bert_dir, resume=True))
    assert history(run.root) == history(tmp_path / "uninterrupted")
    for metric in ("auroc", "brier", "loss", "f1"):
        assert run.checkpoint(metric).name == RunDirectory(tmp_path / "uninterrupted").checkpoint(metric).name


def test_resume_refuses_other_options(tmp_path, monkeypatch, notes_csv, tiny_bert_dir):
    with monkeypatch.context() as patch:
        stop_during_step(patch, 5)
        with pytest.raises(Stopped):
            fit(*options(tmp_path / "run", notes_csv, tiny_bert_dir))
    with pytest.raises(ConfigError, match=r"other options \(--encoder-lr 0\.002 -> 0\.001; --seed 1 -> 2\)"):
        fit(*options(tmp_path / "run", notes_csv, tiny_bert_dir, resume=True, encoder_lr=1e-3, seed=2))
    with pytest.raises(RunDirectoryError, match=r"holds a stopped run .*pass --resume"):
        fit(*options(tmp_path / "run", notes_csv, tiny_bert_dir))  # starting over would discard it


def test_resume_without_a_state_or_with_a_torn_one_is_a_clear_error(tmp_path, monkeypatch, notes_csv, tiny_bert_dir):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        fit(*options(tmp_path / "never-run", notes_csv, tiny_bert_dir, resume=True))
    with monkeypatch.context() as patch:
        stop_during_step(patch, 5)
        with pytest.raises(Stopped):
            fit(*options(tmp_path / "run", notes_csv, tiny_bert_dir))
    state = RunDirectory(tmp_path / "run").resume_file
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(RunDirectoryError, match=r"resume\.pt is not a readable resumable state"):
        fit(*options(tmp_path / "run", notes_csv, tiny_bert_dir, resume=True))
    state.unlink()
    with pytest.raises(RunDirectoryError, match=r"no resumable state at .*resume\.pt"):
        fit(*options(tmp_path / "run", notes_csv, tiny_bert_dir, resume=True))
