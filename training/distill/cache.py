"""The teacher cache: what the frozen teacher contributes to each training note, on disk, computed once.

The teacher is frozen and the notes are fixed (unless `--render mixed`), so its targets never change:
computing them once makes a distillation step cost about a plain fine-tuning step. At a hospital's scale
they do not fit in RAM (dense fp32 padded to `--max-words`: ~0.6 MB a note, 52 GB for 88k notes), so:

- they are stored in fp16, and ragged: a note keeps only its own aligned words, not the padding up to
  `--max-words` (the word axes are cut to the note's word count);
- each kind of feature is one flat file, the notes one after another, with an int64 offsets index for
  the ragged ones. A build appends batch by batch (plain writes: no mapped pages stay in memory) and a
  lookup reads its batch's notes through memory maps, so RAM does not grow with the number of notes;
- a cache lives in `<cache dir>/<fingerprint>/`, the fingerprint being a sha256 over everything the
  targets depend on (`cache_key`): built once, then reused by every run and seed with the same notes,
  teacher and options. A build writes into a temporary directory renamed into place when complete, so a
  stopped build is never reused.

Files of a cache (N notes, w words of a note, L mapped layers, H compared heads, D teacher width, C classes):

    manifest.json           what the fingerprint was made of (no note text), the shapes, the bytes
    words.npy               [N] int64: each note's aligned words w
    hidden.bin              fp16, note after note: [L, w, D] word states, or [L, w, w] word relations
    attention.bin           fp16, note after note: [L, H, w, w] word-to-word attention
    hidden_offsets.npy      [N + 1] int64: where each note starts in hidden.bin, in elements
    attention_offsets.npy   [N + 1] int64: the same for attention.bin
    sentence.bin            fp16 [N, D]: the teacher's last layer averaged over the note's tokens
    logits.bin              fp16 [N, C]: only for a teacher with a classification head
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import numpy as np
import tokenizers
import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import CONFIG_NAME, cached_file

from training.collate import Positions
from training.distill.losses import MultiLevelDistillLoss, TeacherWordFeatures
from training.distill.teacher import TeacherOutputs, run_teacher
from training.pretrained import models_dir

if TYPE_CHECKING:
    from training.distill.objective import DistillCollator

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# The teacher returns every layer's attention maps of a batch at once ([B, H, T, T] per layer, fp32), so a build
# batch holds at most this many bytes of them: a batch of 32 notes of 512 teacher tokens would hold 2.4 GB for
# minilm-l6, and the build's peak memory would follow the longest notes of the data.
ATTENTION_BYTES_PER_BATCH = 128 * 2**20
LENGTH_CHUNK = 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def default_cache_dir() -> Path:
    return models_dir() / "teacher-cache"


def cache_key(collator: DistillCollator, teacher: PreTrainedModel, loss: MultiLevelDistillLoss) -> dict[str, Any]:
    """Everything the teacher's targets for the collator's notes depend on, as JSON values (the notes as a digest)."""
    return {
        "notes": _digest(text.encode() for text in collator.examples.texts),
        "teacher": _teacher_files(teacher),
        "teacher_tokenizer": _tokenizer_digest(collator.teacher_tokenizer),
        "student_tokenizer": _tokenizer_digest(collator.tokenizer),  # words are aligned on both tokenizations
        "targets": {
            "teacher_layers": [teacher_layer for _, teacher_layer in loss.layer_map],
            "relation": loss.relation,
            "attention_heads": loss.options.attention_heads,
            "word_policy": collator.word_policy,
            "max_words": collator.max_words,
            "max_length": collator.max_length,
            "teacher_max_length": collator.teacher_max_length,
        },
        # The code that makes the targets: once it changes, targets made by the old code are not reused.
        "code": _digest(path.read_bytes() for path in sorted(Path(__file__).parent.glob("*.py"))),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }


def fingerprint(key: dict[str, Any]) -> str:
    """The cache directory's name: sha256 of the key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def load_or_build(
    root: Path,
    collator: DistillCollator,
    teacher: PreTrainedModel,
    loss: MultiLevelDistillLoss,
    device: torch.device,
    batch_size: int = 32,
) -> TeacherCache:
    """The cache of the collator's notes under `root`: reused when complete, else built by running the teacher."""
    key = cache_key(collator, teacher, loss)
    directory = root / fingerprint(key)
    if (directory / MANIFEST).is_file():
        log.info("reusing teacher cache %s (%s)", directory.name[:12], directory)
        return TeacherCache.open(directory)

    root.mkdir(parents=True, exist_ok=True)
    # mkdtemp's owner-only permissions are kept: the features are derived from patient notes.
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name[:12]}-", dir=root))
    try:
        log.info("building teacher cache %s in %s", directory.name[:12], root)
        _return_freed_buffers_to_the_os()
        # Its own generator: a DataLoader draws a seed from the global RNG otherwise, and a run that builds the
        # cache would then train differently from the same run reusing it.
        batches = build_batches(collator, teacher.config, batch_size)
        loader = torch.utils.data.DataLoader(
            Positions(len(collator.examples)), batch_sampler=batches, collate_fn=collator, generator=torch.Generator()
        )
        layout = _write_features(staging, teacher, loss, loader, device)
        size = sum(path.stat().st_size for path in staging.iterdir())
        manifest = {"fingerprint": directory.name, "key": key, **layout, "bytes": size}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            staging.rename(directory)
        except OSError:
            if not (directory / MANIFEST).is_file():
                raise  # else another run finished the same cache first: it is used, this copy dropped
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    cache = TeacherCache.open(directory)
    notes, size = cache.manifest["notes"], cache.manifest["bytes"]
    log.info(
        "teacher cache %s: %d notes, %.0f MB (%.1f KB a note)",
        directory.name[:12],
        notes,
        size / 2**20,
        size / notes / 1024,
    )
    return cache


def build_batches(collator: DistillCollator, teacher_config: Any, max_batch_size: int) -> list[list[int]]:
    """Consecutive runs of note positions (the cache is written note after note) of at most `max_batch_size`
    notes, each short enough that the teacher's attention maps stay within ATTENTION_BYTES_PER_BATCH."""
    texts = collator.examples.texts
    lengths = [
        len(ids)
        for start in range(0, len(texts), LENGTH_CHUNK)  # a chunk at a time: only the lengths are kept
        for ids in collator.teacher_tokenizer(
            texts[start : start + LENGTH_CHUNK], truncation=True, max_length=collator.teacher_max_length
        )["input_ids"]
    ]
    bytes_per_token_pair = 4 * teacher_config.num_hidden_layers * teacher_config.num_attention_heads
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for position, length in enumerate(lengths):
        longest_with_it = max(longest, length)
        too_big = (len(batch) + 1) * longest_with_it**2 * bytes_per_token_pair > ATTENTION_BYTES_PER_BATCH
        if batch and (len(batch) == max_batch_size or too_big):
            batches.append(batch)
            batch, longest_with_it = [], length
        batch.append(position)
        longest = longest_with_it
    if batch:
        batches.append(batch)
    return batches


@dataclass
class TeacherCache:
    """A built cache, read through memory maps: a lookup reads only its batch's notes."""

    manifest: dict[str, Any]
    words: np.ndarray  # [N] aligned words of each note
    hidden: np.ndarray  # flat fp16, see the module doc
    hidden_offsets: np.ndarray  # [N + 1]
    attention: np.ndarray  # flat fp16
    attention_offsets: np.ndarray  # [N + 1]
    sentence: np.ndarray  # [N, D] fp16
    logits: np.ndarray | None  # [N, C] fp16, for a teacher with a classification head

    @classmethod
    def open(cls, directory: Path) -> TeacherCache:
        manifest = json.loads((directory / MANIFEST).read_text())
        notes, classes = manifest["notes"], manifest["classes"]
        hidden_offsets = np.load(directory / "hidden_offsets.npy")
        attention_offsets = np.load(directory / "attention_offsets.npy")
        return cls(
            manifest=manifest,
            words=np.load(directory / "words.npy"),
            hidden=_read_only(directory / "hidden.bin", (int(hidden_offsets[-1]),)),
            hidden_offsets=hidden_offsets,
            attention=_read_only(directory / "attention.bin", (int(attention_offsets[-1]),)),
            attention_offsets=attention_offsets,
            sentence=_read_only(directory / "sentence.bin", (notes, manifest["width"])),
            logits=None if classes is None else _read_only(directory / "logits.bin", (notes, classes)),
        )

    def lookup(self, positions: torch.Tensor, num_words: int, device: torch.device) -> TeacherOutputs:
        """The teacher's outputs for the notes at `positions`, padded to the batch's `num_words`, fp32 on `device`."""
        rows = positions.cpu().numpy()
        words = self.words[rows]
        if int(words.max(initial=0)) != num_words:
            raise RuntimeError(
                f"the teacher cache holds up to {int(words.max(initial=0))} words for these notes, the batch "
                f"{num_words}: the cache was made from other notes or options (delete {self.manifest['fingerprint']})"
            )
        layers, heads, width, relation = (self.manifest[k] for k in ("layers", "heads", "width", "relation"))
        hidden = np.zeros((layers, len(rows), num_words, num_words if relation else width), np.float16)
        attention = np.zeros((layers, len(rows), heads, num_words, num_words), np.float16)
        for note, (row, w) in enumerate(zip(rows.tolist(), words.tolist(), strict=True)):
            size = w if relation else width
            start, end = self.hidden_offsets[row : row + 2]
            hidden[:, note, :w, :size] = self.hidden[start:end].reshape(layers, w, size)
            start, end = self.attention_offsets[row : row + 2]
            attention[:, note, :, :w, :w] = self.attention[start:end].reshape(layers, heads, w, w)
        features = TeacherWordFeatures(_to(hidden, device), _to(attention, device), relation=relation)
        logits = None if self.logits is None else _to(self.logits[rows], device)
        return TeacherOutputs(features, _to(self.sentence[rows], device), logits)


def _write_features(
    directory: Path,
    teacher: PreTrainedModel,
    loss: MultiLevelDistillLoss,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
) -> dict[str, Any]:
    """Runs the teacher over the loader's notes, in order, appending each note's features to the files;
    writes the index and returns the shapes for the manifest."""
    counts: list[int] = []
    layout: dict[str, Any] = {}
    with ExitStack() as stack:
        files: dict[str, BinaryIO] = {}

        def append(name: str, array: np.ndarray) -> None:
            if name not in files:
                files[name] = stack.enter_context((directory / f"{name}.bin").open("wb"))
            files[name].write(array.tobytes())  # C order, whatever the view's strides

        for batch in tqdm(loader, desc="teacher cache", unit="batch"):
            positions = batch["positions"].tolist()
            if positions != list(range(len(counts), len(counts) + len(positions))):
                raise ValueError("the teacher cache is written note after note: its loader must not shuffle")
            out = run_teacher(teacher, loss, {k: v.to(device) for k, v in batch.items()})
            hidden, attention = _fp16(out.words.hidden), _fp16(out.words.attention)  # [L, B, W, X], [L, B, H, W, W]
            relation = out.words.relation
            words = batch["word_mask"].sum(dim=1).tolist()
            for note, w in enumerate(words):
                append("hidden", hidden[:, note, :w, :w] if relation else hidden[:, note, :w])
                append("attention", attention[:, note, :, :w, :w])
            append("sentence", _fp16(out.sentence))
            if out.logits is not None:
                append("logits", _fp16(out.logits))
            counts.extend(words)
            layout = layout or {
                "layers": hidden.shape[0],
                "heads": attention.shape[2],
                "width": out.sentence.shape[-1],
                "relation": relation,
                "classes": None if out.logits is None else out.logits.shape[-1],
                "dtype": "float16",
            }
    if not counts:
        raise ValueError("the teacher cache needs at least one note")

    words_per_note = np.array(counts, dtype=np.int64)
    last_axis = words_per_note if layout["relation"] else np.full_like(words_per_note, layout["width"])
    np.save(directory / "words.npy", words_per_note)
    np.save(directory / "hidden_offsets.npy", _offsets(layout["layers"] * words_per_note * last_axis))
    np.save(directory / "attention_offsets.npy", _offsets(layout["layers"] * layout["heads"] * words_per_note**2))
    return {"notes": len(counts), **layout}


def _return_freed_buffers_to_the_os() -> None:
    """glibc raises its mmap threshold after each large free (up to 32 MB), so the teacher's buffers, of another
    shape every batch, then come from its heap and fragment it: the build's RSS crept up with the number of notes.
    A fixed 1 MB threshold maps every larger buffer on its own and hands it back when freed. Process-wide."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (e.g. musl): nothing to tune
    libc.mallopt(M_MMAP_THRESHOLD, 2**20)


def _offsets(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _fp16(tensor: torch.Tensor) -> np.ndarray:
    half = tensor.half()
    if not half.isfinite().all():
        raise ValueError("teacher features beyond float16's range cannot be cached: pass --no-teacher-cache")
    return half.cpu().numpy()


def _read_only(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only memory map of a flat fp16 file (an empty file cannot be mapped: an empty array)."""
    if path.stat().st_size == 0:
        return np.zeros(shape, np.float16)
    return np.memmap(path, dtype=np.float16, mode="r", shape=shape)


def _to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """fp16 rows -> fp32 on `device` (copied there in fp16: half the bytes)."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device).float()


def _digest(chunks: Iterable[bytes]) -> str:
    """sha256 over length-prefixed chunks (no two different sequences of chunks give the same bytes)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk)
    return digest.hexdigest()


def _tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the whole fast tokenizer (vocabulary, normalizer, pre-tokenizer, post-processor)."""
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError("word alignment and the teacher cache need fast tokenizers")
    backend = tokenizer.backend_tokenizer
    # Truncation and padding are stored in it by the last call, and set again by every call (the lengths are
    # in the key): cleared so that the digest does not depend on what the tokenizer was last called with.
    backend.no_truncation()
    backend.no_padding()
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def _teacher_files(teacher: PreTrainedModel) -> dict[str, Any]:
    """The teacher's directory, config and weight files. The weights enter by size and modification time,
    which saving or training a teacher again changes, rather than by hashing them: reading several hundred
    MB of weights would cost every run that reuses the cache."""
    name = teacher.name_or_path
    if not name:
        raise ValueError("the teacher cache identifies a teacher by its files: load it from a directory or the hub")
    directory = Path(name)
    if not directory.is_dir():  # a hub id: its snapshot in the Hugging Face cache, whose path names the commit
        directory = Path(cast(str, cached_file(name, CONFIG_NAME))).parent  # a missing file raises
    directory = directory.resolve()
    weights = sorted(path for path in directory.iterdir() if path.suffix in WEIGHT_SUFFIXES)
    return {
        "path": str(directory),
        "class": type(teacher).__name__,  # with or without a classification head
        "config": hashlib.sha256((directory / CONFIG_NAME).read_bytes()).hexdigest(),
        "weights": {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in weights},
    }
