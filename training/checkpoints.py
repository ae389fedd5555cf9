"""Best-by-metric checkpoints: one save per epoch that is best for any metric, `best-<metric>` links to it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

# metric -> True if higher is better
TRACKED = {"auroc": True, "brier": False, "loss": False, "f1": True}


class CheckpointKeeper:
    def __init__(self, run_dir: Path):
        self.root = run_dir / "checkpoints"
        self.best: dict[str, float] = {}

    def update(
        self, epoch: int, metrics: dict[str, float], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> list[str]:
        """Save when `metrics` beat the best so far on any tracked metric; returns the metrics improved."""
        improved = [m for m, higher in TRACKED.items() if self._better(m, metrics[m], higher)]
        if not improved:
            return []
        target = self.root / f"epoch-{epoch}"
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        (target / "checkpoint.json").write_text(json.dumps({"epoch": epoch, "valid": metrics}, indent=2))
        for metric in improved:
            self.best[metric] = metrics[metric]
            link = self.root / f"best-{metric}"
            link.unlink(missing_ok=True)
            link.symlink_to(target.name, target_is_directory=True)
        self._remove_unreferenced()
        return improved

    def _better(self, metric: str, value: float, higher: bool) -> bool:
        if metric not in self.best:
            return True
        return value > self.best[metric] if higher else value < self.best[metric]

    def _remove_unreferenced(self) -> None:
        kept = {link.resolve().name for link in self.root.glob("best-*")}
        for directory in self.root.glob("epoch-*"):
            if directory.name not in kept:
                shutil.rmtree(directory)


def checkpoint_dir(run_dir: Path, metric: str) -> Path:
    path = Path(run_dir) / "checkpoints" / f"best-{metric}"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint; metrics kept are {sorted(TRACKED)}")
    return path.resolve()
