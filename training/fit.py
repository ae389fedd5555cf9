"""The training loop shared by every method: AdamW with two learning rates, warmup, clipping,
gradient accumulation, mixed precision (--precision), early stopping, best-by-metric checkpoints and a resumable
state (--resume)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup, set_seed

from training.checkpoints import CheckpointKeeper
from training.collate import epoch_batches
from training.config import (
    DataArguments,
    DistillArguments,
    EvalArguments,
    ModelArguments,
    TrainingArguments,
    check_fit_options,
)
from training.data.loading import load_parts
from training.evaluate import compute_metrics
from training.modeling import load_student, load_tokenizer, parameter_groups, to_device
from training.objectives import CrossEntropyObjective, TrainingStep
from training.parallel import Processes
from training.precision import mixed_precision
from training.predict import predict_proba
from training.quantization import CALIBRATION_NOTES, QuantizationAware
from training.resume import Progress, process_state, restore, save_state, start_or_resume
from training.run_dir import RunDirectory
from training.run_report import evaluate_run
from training.tracking import NoTracker, Tracker, open_tracking, start_tracking

log = logging.getLogger(__name__)


def build_objective(method, model, tokenizer, model_args, distill_args, train_parts, device):
    if method == "base":
        return CrossEntropyObjective(tokenizer, model_args.max_length)
    if method == "layer-kd":
        from training.distill.layers import build_layer_distill_objective

        return build_layer_distill_objective(model, tokenizer, model_args, distill_args, device)
    from training.distill.objective import build_distill_objective

    return build_distill_objective(method, model, tokenizer, model_args, distill_args, train_parts, device)


def fit(
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: TrainingArguments,
    distill_args: DistillArguments,
    eval_args: EvalArguments,
) -> Path:
    """Train, keep the best checkpoints, evaluate the `select_metric` one on test; returns the run directory.
    Under torchrun, one of the data-parallel processes (training/parallel.py): rank 0 writes and evaluates."""
    check_fit_options(data_args, model_args, train_args, distill_args, eval_args)
    processes = Processes.from_environment()
    device = processes.device(train_args.device)
    processes.start(device)
    main = processes.is_main
    run = RunDirectory(Path(train_args.out))
    state = start_or_resume(run, data_args, model_args, train_args, distill_args, eval_args, write=main)
    if state is not None and run.split_file.is_file():
        data_args = replace(data_args, split_file=str(run.split_file))  # the saved split: an error if the data changed
    # --report-to: logs the options now, then each epoch and the report (a resumed run goes on logging to its tracker)
    tracker: Tracker = NoTracker()
    if main:
        tracker = start_tracking(run, train_args) if state is None else open_tracking(run)
    if train_args.threads:
        torch.set_num_threads(train_args.threads)
    set_seed(train_args.seed)

    parts = load_parts(data_args, save_split=run.split_file if main and state is None else None)
    tokenizer = load_tokenizer(model_args.student)
    # distillation reads attention maps, and quantization-aware training rounds them
    attn = "sdpa" if train_args.method == "base" and not train_args.quantization_aware else "eager"
    model = to_device(load_student(model_args.student, attn, model_args.student_layers), device)
    if train_args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    quantization = None
    if train_args.quantization_aware:
        calibration = parts["train"].texts[:CALIBRATION_NOTES]
        quantization = QuantizationAware(model, tokenizer, calibration, model_args.max_length, device)
    with processes.main_first():  # rank 0 builds the teacher cache, the others open it
        objective = build_objective(
            train_args.method, model, tokenizer, model_args, distill_args, parts["train"], device
        )

    collator = objective.collator(parts["train"])
    notes = len(parts["train"])
    trainable = TrainingStep(model, objective, [quantization.ranges] if quantization else [])
    step_module = processes.wrap(trainable, device)
    groups = parameter_groups(model, train_args.encoder_lr, train_args.head_lr, train_args.weight_decay)
    extra = [p for module in objective.extra_modules() for p in module.parameters()]
    if extra:
        groups.append({"params": extra, "lr": train_args.head_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    batches_per_epoch = len(processes.deal(epoch_batches(notes, train_args.batch_size, train_args.seed, 1)))
    steps_per_epoch = math.ceil(batches_per_epoch / train_args.grad_accum)
    total_steps = steps_per_epoch * train_args.epochs
    if train_args.max_steps:
        total_steps = min(total_steps, train_args.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(train_args.warmup_ratio * total_steps), total_steps)
    dtype, autocast, scaler = mixed_precision(train_args.precision, device)

    keeper = CheckpointKeeper(run)
    prevalence = float(parts["train"].labels.mean())
    progress = (
        Progress()
        if state is None
        else restore(state, trainable, optimizer, scheduler, scaler, processes.rank, processes.size)
    )
    del state  # loaded into the training objects: the copy is freed
    if main:
        keeper.load_state_dict(progress.best)
        run.history_file.write_text("".join(json.dumps(record) + "\n" for record in progress.history))
    start = time.perf_counter() - progress.elapsed_s

    def save_progress() -> None:
        progress.elapsed_s = time.perf_counter() - start
        every_process = processes.gather([process_state(progress)])
        if main:
            save_state(run.resume_file, trainable, optimizer, scheduler, scaler, progress, every_process)

    for epoch in range(progress.epoch, train_args.epochs + 1):
        # --render mixed: every training note is re-drawn each epoch (validation keeps its fixed epoch-0 draw).
        collator.examples = parts["train"].for_epoch(epoch)
        if quantization is not None and progress.epoch_steps == 0:  # a resumed epoch keeps its saved ranges
            quantization.calibrate()
        step_module.train()
        done = progress.epoch_steps * train_args.grad_accum  # batches a stopped session trained on
        # Collated here rather than by a DataLoader, whose every iterator draws a seed from the RNG a resumed
        # run restores.
        own = processes.deal(epoch_batches(notes, train_args.batch_size, train_args.seed, epoch))
        batches = map(collator, own[done:])
        bar = tqdm(
            total=steps_per_epoch,
            initial=progress.epoch_steps,
            desc=f"epoch {epoch}",
            unit="step",
            leave=False,
            disable=not main,
        )
        while progress.step < total_steps and (group := list(islice(batches, train_args.grad_accum))):
            group = [{k: v.to(device) for k, v in b.items()} for b in group]
            # The distillation losses are divided by the step's aligned words; DDP averages the processes'
            # gradients, so each process divides by the mean count.
            words = processes.mean(sum(objective.count_words(b) for b in group))
            for i, batch in enumerate(group):
                with processes.synchronizing(step_module, last=i == len(group) - 1):
                    with autocast():
                        loss, logs = step_module(batch, len(group), words)
                    scaler.scale(loss).backward()
                progress.epoch_logs.append(logs)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], train_args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress.step += 1
            progress.epoch_steps += 1
            bar.update()
            bar.set_postfix(loss=f"{logs['ce']:.3f}")
            if train_args.checkpoint_steps and progress.step % train_args.checkpoint_steps == 0:
                save_progress()
        bar.close()

        metrics = _validate(model, tokenizer, parts["valid"], prevalence, train_args, model_args, device, processes)
        improved = processes.from_main(keeper.update, epoch, metrics, model, tokenizer)
        progress.best = keeper.state_dict()
        train = _epoch_summary(processes.gather(progress.epoch_logs))
        record = {
            "epoch": epoch,
            "step": progress.step,
            "elapsed_s": round(time.perf_counter() - start, 1),
            "train": train,
            "valid": metrics,
            "improved": improved,
        }
        progress.history.append(record)
        if main:
            with run.history_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            tracker.log_epoch(record)
            counts = [f"{k} {v}" for k, v in train.items() if isinstance(v, int)]
            log.info(
                "epoch %d: valid auroc %.4f brier %.4f loss %.4f%s%s",
                epoch,
                metrics["auroc"],
                metrics["brier"],
                metrics["loss"],
                f" (best {', '.join(improved)})" if improved else "",
                f"; train {', '.join(counts)}" if counts else "",
            )
        progress.stale = 0 if train_args.select_metric in improved else progress.stale + 1
        if progress.stale >= train_args.patience or progress.step >= total_steps or epoch == train_args.epochs:
            break
        progress.epoch, progress.epoch_steps, progress.epoch_logs = epoch + 1, 0, []
        save_progress()

    train_seconds = time.perf_counter() - start
    if main:
        summary = {
            "steps": progress.step,
            "epochs": epoch,
            "train_seconds": round(train_seconds, 1),
            "device": str(device),
            "precision": str(dtype).removeprefix("torch."),
            "processes": processes.size,
        }
        run.summary_file.write_text(json.dumps(summary, indent=2))
        log.info(
            "trained %d steps in %.0f s; evaluating best-%s on test",
            progress.step,
            train_seconds,
            train_args.select_metric,
        )
        evaluate_run(run, eval_args, parts=parts, metric=train_args.select_metric, device=device)
        run.resume_file.unlink(missing_ok=True)  # the run is complete: nothing is left to resume
        tracker.log_report(run.eval_dir())
        tracker.finish()
    del step_module  # DDP's reducer holds the process group: it goes first, or gloo aborts at exit
    processes.stop()
    return run.root


def _epoch_summary(epoch_logs: list[dict[str, float]]) -> dict[str, float]:
    """One epoch of step logs: counts (int values, e.g. aligned words) summed, losses (floats) averaged."""
    if not epoch_logs:
        return {}
    return {
        k: sum(int(entry[k]) for entry in epoch_logs)
        if isinstance(epoch_logs[0][k], int)
        else float(np.mean([entry[k] for entry in epoch_logs]))
        for k in epoch_logs[0]
    }


def _validate(model, tokenizer, valid, prevalence, train_args, model_args, device, processes) -> dict[str, float]:
    """Metrics of the whole validation split; each process predicts its share, and every one gets all of them."""
    own = processes.own_share(valid.texts)
    probs, logits = (
        processes.gather_shares(part)
        for part in predict_proba(model, tokenizer, own, train_args.eval_batch_size, model_args.max_length, device)
    )
    metrics = compute_metrics(valid.labels, probs, prevalence)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(valid.labels)).item()
    return {"auroc": metrics["auroc"], "brier": metrics["brier"], "f1": metrics["f1"], "loss": loss}
