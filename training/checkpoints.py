"""Best-by-metric checkpoints: one save per epoch that is best for any metric, `best-<metric>` links to it."""

from __future__ import annotations

import json
import shutil

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.config import SELECT_METRICS, SelectMetric
from training.run_dir import RunDirectory

# metric -> True if higher is better
TRACKED: dict[SelectMetric, bool] = {"auroc": True, "brier": False, "loss": False, "f1": True}
assert set(TRACKED) == set(SELECT_METRICS)


class CheckpointKeeper:
    def __init__(self, run: RunDirectory):
        self.run = run
        self.best: dict[SelectMetric, float] = {}

    def update(
        self, epoch: int, metrics: dict[str, float], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> list[SelectMetric]:
        """Save when `metrics` beat the best so far on any tracked metric; returns the metrics improved."""
        improved = [m for m, higher in TRACKED.items() if self._better(m, metrics[m], higher)]
        if not improved:
            return []
        target = self.run.epoch_checkpoint(epoch)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        info = {"epoch": epoch, "valid": metrics}
        self.run.checkpoint_info_file(target).write_text(json.dumps(info, indent=2))
        for metric in improved:
            self.best[metric] = metrics[metric]
            link = self.run.best_link(metric)
            link.unlink(missing_ok=True)
            link.symlink_to(target.name, target_is_directory=True)
        self._remove_unreferenced()
        return improved

    def state_dict(self) -> dict[str, list[float]]:
        """The best value of each metric so far and the epoch it was reached at (the resumable state keeps it)."""
        return {metric: [value, self._epoch_of(metric)] for metric, value in self.best.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        """Back to `state`: links to its epochs again, and checkpoints saved after it (by a stopped session) removed."""
        self.best = {}
        for metric in TRACKED:
            link = self.run.best_link(metric)
            link.unlink(missing_ok=True)
            if metric in state:
                value, epoch = state[metric]
                self.best[metric] = value
                link.symlink_to(self.run.epoch_checkpoint(int(epoch)).name, target_is_directory=True)
        self._remove_unreferenced()

    def _epoch_of(self, metric: SelectMetric) -> int:
        return int(self.run.best_link(metric).resolve().name.removeprefix("epoch-"))

    def _better(self, metric: SelectMetric, value: float, higher: bool) -> bool:
        if metric not in self.best:
            return True
        return value > self.best[metric] if higher else value < self.best[metric]

    def _remove_unreferenced(self) -> None:
        kept = {self.run.best_link(metric).resolve().name for metric in TRACKED}
        for directory in self.run.checkpoints_dir.glob("epoch-*"):
            if directory.name not in kept:
                shutil.rmtree(directory)
