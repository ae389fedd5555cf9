"""Data-parallel `fit` under torchrun: 2 CPU processes (gloo) against 1 process with the same global batch,
on the tiny fixture models and SYNTHETIC notes.

Two processes with --batch-size 8 take each optimizer step on 2 x 8 notes, as one process with --batch-size 8
--grad-accum 2 does on the same notes: it adds the two batches' gradients, each halved, where DDP adds the
processes' gradients and halves them. A halved float is exact, so the two runs compute the same weights to
the bit. What may differ is rounding outside the steps: the epoch means of the step logs add the steps in
another order (~1e-16), and each process predicts half of the validation notes, in other batches and so
with other padding than one process predicting all (~1e-7 on a probability). Hence the tolerances: 1e-9 on
the training logs, 1e-6 on the validation metrics; a step computed differently (a wrong loss scale, a note
dropped or seen twice) moves them by 1e-4 and more.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.errors import ConfigError
from training.fit import fit
from training.parallel import Processes
from training.run_dir import RunDirectory

TRAIN_TOLERANCE, VALID_TOLERANCE = 1e-9, 1e-6
EPOCHS = 2


@pytest.fixture(scope="module")
def student_without_dropout(tmp_path_factory, tiny_bert_dir):
    """The tiny student with dropout off: with it, each process draws its own masks, and the runs are two
    samples of the same training rather than one computation."""
    import shutil

    out = tmp_path_factory.mktemp("student-without-dropout")
    shutil.copytree(tiny_bert_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def options(method: str, grad_accum: int) -> dict:
    return {
        "method": method,
        "max_length": 64,
        "epochs": EPOCHS,
        "batch_size": 8,
        "grad_accum": grad_accum,
        "encoder_lr": 2e-3,
        "head_lr": 5e-3,
        "seed": 1,
        "threads": 1,
        "device": "cpu",
        "word_policy": "all",
        "teacher_max_length": 16,
        "teacher_cache": method == "mlkd",  # ensemble: the live teacher
        "bootstrap": 10,
    }


def one_process(out, data, student, teacher, method):
    values = {**options(method, grad_accum=2), "out": str(out)}

    def group(cls):
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})

    model = ModelArguments(student=str(student), teacher=str(teacher), max_length=values["max_length"])
    fit(DataArguments(data=str(data)), model, group(TrainingArguments), group(DistillArguments), group(EvalArguments))


def torchrun_fit(out, data, student, teacher, method, *more_flags) -> list[str]:
    """`torchrun --nproc-per-node 2 -m training fit ...` (torchrun is torch.distributed.run)."""
    flags = [f"--data={data}", f"--student={student}", f"--teacher={teacher}", f"--out={out}", *more_flags]
    for name, value in options(method, grad_accum=1).items():
        flag = "--" + name.replace("_", "-")
        flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag}={value}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return [*torchrun, "-m", "training", "fit", *flags]


def environment(models_dir) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRIAGE_MODELS_DIR": str(models_dir)}


def two_processes(out, data, student, teacher, method, models_dir, *more_flags) -> str:
    """Runs `torchrun_fit`; returns its output."""
    command = torchrun_fit(out, data, student, teacher, method, *more_flags)
    result = subprocess.run(command, env=environment(models_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def history(out) -> list[dict]:
    return [json.loads(line) for line in RunDirectory(out).history_file.read_text().splitlines()]


def assert_same_training(one: list[dict], two: list[dict]) -> None:
    assert [record["epoch"] for record in two] == list(range(1, EPOCHS + 1))  # written once, by rank 0
    for single, parallel in zip(one, two, strict=True):
        assert parallel["step"] == single["step"] == 9 * single["epoch"]  # 140 notes: 18 batches of 8, 9 steps
        for name, value in single["valid"].items():
            assert parallel["valid"][name] == pytest.approx(value, abs=VALID_TOLERANCE), name
        for name, value in single["train"].items():  # every process's step logs: counts add up to one run's
            expected = value if isinstance(value, int) else pytest.approx(value, abs=TRAIN_TOLERANCE)
            assert parallel["train"][name] == expected, name


def test_batches_are_dealt_round_the_processes_and_the_leftover_left_out():
    batches = [[i] for i in range(7)]
    dealt = [Processes(rank=rank, size=3).deal(batches) for rank in range(3)]
    assert dealt == [[[0], [3]], [[1], [4]], [[2], [5]]]  # batch 6 cannot go round: every process takes 2 steps
    assert Processes().deal(batches) == batches


def test_under_torchrun_each_process_takes_its_own_gpu():
    processes = Processes(rank=3, local_rank=1, size=4)
    assert processes.device("cpu") == torch.device("cpu")
    assert processes.device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="--device cuda:0: under torchrun each process uses its own GPU"):
        processes.device("cuda:0")
    assert Processes().device("cuda:0") == torch.device("cuda", 0)


@pytest.mark.parametrize("method", ["base", "mlkd", "ensemble"])
def test_two_processes_train_as_one_with_the_same_global_batch(
    tmp_path, notes_csv, student_without_dropout, tiny_teacher_dir, method
):
    one_process(tmp_path / "one", notes_csv, student_without_dropout, tiny_teacher_dir, method)
    output = two_processes(tmp_path / "two", notes_csv, student_without_dropout, tiny_teacher_dir, method, tmp_path)

    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert_same_training(one, two)
    print(f"{method} final validation: 1 process {one[-1]['valid']}, 2 processes {two[-1]['valid']}")
    weights = [
        load_file(RunDirectory(tmp_path / name).checkpoint("loss") / "model.safetensors") for name in ("one", "two")
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])

    summary = json.loads(RunDirectory(tmp_path / "two").summary_file.read_text())
    assert summary["processes"] == 2
    assert RunDirectory(tmp_path / "two").metrics_file().is_file()
    assert not RunDirectory(tmp_path / "two").resume_file.exists()
    if method == "mlkd":  # built by rank 0, opened by rank 1
        assert output.count("building teacher cache") == 1 and output.count("reusing teacher cache") == 1


def test_two_processes_killed_mid_epoch_resume_to_the_uninterrupted_run(
    tmp_path, notes_csv, student_without_dropout, tiny_teacher_dir
):
    """A real kill: both workers and the torchrun agent get SIGKILL once the first resumable state is written."""
    one_process(tmp_path / "one", notes_csv, student_without_dropout, tiny_teacher_dir, "base")
    out, models_dir = tmp_path / "two", tmp_path / "models"
    command = torchrun_fit(out, notes_csv, student_without_dropout, tiny_teacher_dir, "base", "--checkpoint-steps=2")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(command, env=environment(models_dir), **quiet)
    state, deadline = RunDirectory(out).resume_file, time.monotonic() + 240
    while not state.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first state"
        time.sleep(0.01)
    # torchrun starts each worker in a session of its own: they are found as its children.
    workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    for pid in [*map(int, workers), process.pid]:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    progress = torch.load(state, weights_only=True)["progress"]
    assert progress["step"] < 9 * EPOCHS  # stopped in the middle of training
    print(f"killed after the state of step {progress['step']} (epoch {progress['epoch']})")

    two_processes(out, notes_csv, student_without_dropout, tiny_teacher_dir, "base", models_dir, "--resume")
    assert_same_training(history(tmp_path / "one"), history(out))
