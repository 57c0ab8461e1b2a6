"""THE table of BLOOM's tensors: for each parameter of a BloomModel, how tensor parallelism splits
it and what every checkpoint format calls it. Save/load, the resharder and the converters read it;
no other module states a split dim or a foreign name. tests/test_checkpoint_table.py holds it
against the model's own parameter attributes (core/tensor_parallel/layers.py's `partition_dim`)
and against a transformers BloomForCausalLM.

Columns:
  part       embedding (the first stage), block (one per layer), final (the last stage), head
             (the last stage's own copy of the word embeddings for the tied head, PP > 1 only)
  ours       the name in a BloomModel chunk's state dict; {i}: the block's index in the chunk
  split_dim  the dim tensor parallelism splits it on: 0 (vocabulary rows, column-parallel
             outputs), 1 (row-parallel inputs) or None (replicated on every TP rank)
  shape      of the full tensor: V the padded vocabulary, H the hidden size, F the MLP size
  megatron   its path in the nested `model` entry of our rank files (Megatron-LM's nesting)
  hf         Hugging Face BloomForCausalLM's name without `transformer.`; {n}: the 0-based layer
             (the head is tied: HF stores the embedding once and its lm_head.weight is ignored)
  deepspeed  its key within its Megatron-DeepSpeed layer file; None: not saved there

Whole-model keys (`key`): each tensor of the model once, for merged states: embed.<ours> for
the embedding, layers.<number>.* for blocks (1-based, as BloomModel.layer_numbers), the final
LayerNorm as ours, head.word_embeddings.weight for the head copy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from ascendspeed.errors import ReshardError

HF_PREFIX = "transformer."  # BloomForCausalLM's prefix of every name but lm_head.weight
# Megatron-DeepSpeed layer-spec indices (its BLOOM pipeline layers): layer_01 the embedding,
# layer_{number + 2} block `number` (1-based), layer_{L + 4} the final LayerNorm.
DEEPSPEED_EMBEDDING_LAYER = 1
DEEPSPEED_BLOCK_OFFSET = 2
DEEPSPEED_FINAL_OFFSET = 4


@dataclass(frozen=True)
class TensorSpec:
    part: str
    ours: str
    split_dim: int | None
    shape: tuple[str, ...]
    megatron: tuple[str, ...]
    hf: str
    deepspeed: str | None

    def key(self, number: int | None = None) -> str:
        """The whole-model key (`number`: the block's 1-based global layer number)."""
        prefix = {"embedding": "embed.", "head": "head."}.get(self.part, "")
        return prefix + self.ours.format(i=number)

    def hf_name(self, number: int | None = None) -> str:
        return self.hf.format(n=None if number is None else number - 1)

    def megatron_path(self, index: int | None = None) -> tuple[str, ...]:
        return tuple(key.format(i=index) for key in self.megatron)

    def deepspeed_layer(self, number: int | None, num_layers: int) -> int:
        """The index NN of the layer_NN-model_TT-model_states.pt file that holds it."""
        return {"embedding": DEEPSPEED_EMBEDDING_LAYER,
                "block": (number or 0) + DEEPSPEED_BLOCK_OFFSET,
                "final": num_layers + DEEPSPEED_FINAL_OFFSET}[self.part]

    def full_shape(self, vocab: int, hidden: int, ffn: int) -> tuple[int, ...]:
        sizes = {"V": vocab, "H": hidden, "F": ffn}
        return tuple(int(size[:-1] or 1) * sizes[size[-1]] for size in self.shape)  # "3H": 3 x H


_EMB = ("language_model", "embedding", "word_embeddings")
_ENC = ("language_model", "encoder")
_HEAD = ("word_embeddings_for_head",)

TABLE = (  # in the model's order (a chunk's state dict lists its tensors so)
    #          part         ours                                                 TP    shape
    #          Megatron path
    #          HF                                                  Megatron-DeepSpeed key
    TensorSpec("embedding", "word_embeddings.weight",                            0,    ("V", "H"),
               _EMB + ("weight",),
               "word_embeddings.weight",                           "word_embeddings.weight"),
    TensorSpec("head",      "word_embeddings.weight",                            0,    ("V", "H"),
               _HEAD + ("weight",),
               "word_embeddings.weight",                           None),
    TensorSpec("embedding", "embedding_layernorm.weight",                        None, ("H",),
               _EMB + ("norm.weight",),
               "word_embeddings_layernorm.weight",                 "word_embeddings.norm.weight"),
    TensorSpec("embedding", "embedding_layernorm.bias",                          None, ("H",),
               _EMB + ("norm.bias",),
               "word_embeddings_layernorm.bias",                   "word_embeddings.norm.bias"),
    TensorSpec("block",     "layers.{i}.input_layernorm.weight",                 None, ("H",),
               _ENC + ("layers.{i}.input_layernorm.weight",),
               "h.{n}.input_layernorm.weight",                     "input_layernorm.weight"),
    TensorSpec("block",     "layers.{i}.input_layernorm.bias",                   None, ("H",),
               _ENC + ("layers.{i}.input_layernorm.bias",),
               "h.{n}.input_layernorm.bias",                       "input_layernorm.bias"),
    TensorSpec("block",     "layers.{i}.self_attention.query_key_value.weight",  0,    ("3H", "H"),
               _ENC + ("layers.{i}.self_attention.query_key_value.weight",),
               "h.{n}.self_attention.query_key_value.weight",      "self_attention.query_key_value.weight"),
    TensorSpec("block",     "layers.{i}.self_attention.query_key_value.bias",    0,    ("3H",),
               _ENC + ("layers.{i}.self_attention.query_key_value.bias",),
               "h.{n}.self_attention.query_key_value.bias",        "self_attention.query_key_value.bias"),
    TensorSpec("block",     "layers.{i}.self_attention.dense.weight",            1,    ("H", "H"),
               _ENC + ("layers.{i}.self_attention.dense.weight",),
               "h.{n}.self_attention.dense.weight",                "self_attention.dense.weight"),
    TensorSpec("block",     "layers.{i}.self_attention.dense.bias",              None, ("H",),
               _ENC + ("layers.{i}.self_attention.dense.bias",),
               "h.{n}.self_attention.dense.bias",                  "self_attention.dense.bias"),
    TensorSpec("block",     "layers.{i}.post_attention_layernorm.weight",        None, ("H",),
               _ENC + ("layers.{i}.post_attention_layernorm.weight",),
               "h.{n}.post_attention_layernorm.weight",            "post_attention_layernorm.weight"),
    TensorSpec("block",     "layers.{i}.post_attention_layernorm.bias",          None, ("H",),
               _ENC + ("layers.{i}.post_attention_layernorm.bias",),
               "h.{n}.post_attention_layernorm.bias",              "post_attention_layernorm.bias"),
    TensorSpec("block",     "layers.{i}.mlp.dense_h_to_4h.weight",               0,    ("F", "H"),
               _ENC + ("layers.{i}.mlp.dense_h_to_4h.weight",),
               "h.{n}.mlp.dense_h_to_4h.weight",                   "mlp.dense_h_to_4h.weight"),
    TensorSpec("block",     "layers.{i}.mlp.dense_h_to_4h.bias",                 0,    ("F",),
               _ENC + ("layers.{i}.mlp.dense_h_to_4h.bias",),
               "h.{n}.mlp.dense_h_to_4h.bias",                     "mlp.dense_h_to_4h.bias"),
    TensorSpec("block",     "layers.{i}.mlp.dense_4h_to_h.weight",               1,    ("H", "F"),
               _ENC + ("layers.{i}.mlp.dense_4h_to_h.weight",),
               "h.{n}.mlp.dense_4h_to_h.weight",                   "mlp.dense_4h_to_h.weight"),
    TensorSpec("block",     "layers.{i}.mlp.dense_4h_to_h.bias",                 None, ("H",),
               _ENC + ("layers.{i}.mlp.dense_4h_to_h.bias",),
               "h.{n}.mlp.dense_4h_to_h.bias",                     "mlp.dense_4h_to_h.bias"),
    TensorSpec("final",     "final_layernorm.weight",                            None, ("H",),
               _ENC + ("final_layernorm.weight",),
               "ln_f.weight",                                      "weight"),
    TensorSpec("final",     "final_layernorm.bias",                              None, ("H",),
               _ENC + ("final_layernorm.bias",),
               "ln_f.bias",                                        "bias"),
)
WORD_EMBEDDINGS, HEAD_COPY = TABLE[0], TABLE[1]
EMBED = WORD_EMBEDDINGS.key()  # "embed.word_embeddings.weight": the model's only copy at PP = 1
HEAD = HEAD_COPY.key()         # "head.word_embeddings.weight": the last stage's copy (PP > 1)
# --embed-layernorm off: a model without these (HF BLOOM always has them)
EMBEDDING_LAYERNORM = tuple(t for t in TABLE if t.ours.startswith("embedding_layernorm."))
FINAL_LAYERNORM = tuple(t for t in TABLE if t.part == "final")


# ------------------------------------------------------------------------ reading names back
def _pattern(template: str, field: str) -> re.Pattern:
    """'layers.{i}.x' -> a regex whose one group is the number in place of {i}."""
    return re.compile(r"(\d+)".join(re.escape(part) for part in template.split("{" + field + "}")))


_OURS = [(_pattern(t.ours, "i"), t) for t in TABLE]
_HF = [(_pattern(t.hf, "n"), t) for t in TABLE if t.part != "head"]  # the head is the embedding
_MEGATRON = [(tuple(_pattern(key, "i") for key in t.megatron), t) for t in TABLE]


def _number(match: re.Match) -> int | None:
    return int(match.group(1)) if match.groups() else None


def parse_ours(name: str, pre_process: bool = True) -> tuple[TensorSpec, int | None]:
    """A chunk's parameter name -> (its row, its block index in the chunk or None). The word
    embeddings of a chunk without the embedding (`pre_process` false) are the head copy."""
    for pattern, tensor in _OURS:
        if tensor is (HEAD_COPY if pre_process else WORD_EMBEDDINGS):
            continue
        match = pattern.fullmatch(name)
        if match:
            return tensor, _number(match)
    raise KeyError(f"{name}: not a BLOOM parameter name (ascendspeed/checkpoint/tensors.py)")


def parse_key(key: str) -> tuple[TensorSpec, int | None]:
    """A whole-model key -> (its row, the block's 1-based layer number or None)."""
    for prefix, part in (("embed.", "embedding"), ("head.", "head")):
        if key.startswith(prefix):
            tensor, _ = parse_ours(key[len(prefix):], part == "embedding")
            return tensor, None
    tensor, number = parse_ours(key)
    if tensor.part == "embedding":
        raise KeyError(f"{key}: the embedding's keys start with 'embed.'")
    return tensor, number


def parse_hf(name: str) -> tuple[TensorSpec, int | None]:
    """An HF name (no `transformer.`) -> (its row, the block's 1-based layer number or None)."""
    for pattern, tensor in _HF:
        match = pattern.fullmatch(name)
        if match:
            number = _number(match)
            return tensor, None if number is None else number + 1
    raise KeyError(f"{name}: not a BloomForCausalLM tensor name")


def split_dim(name: str) -> int | None:
    """The TP split dim of a parameter, by our name or whole-model key (None: replicated)."""
    try:
        return parse_ours(name)[0].split_dim
    except KeyError:
        return parse_key(name)[0].split_dim


def hf_split_dim(name: str) -> int | None:
    """The TP split dim of an HF-named tensor (None: replicated)."""
    return parse_hf(name)[0].split_dim


# ------------------------------------------------------------------ chunks and whole-model keys
@dataclass(frozen=True)
class Chunk:
    """A pipeline stage or virtual chunk: its blocks (1-based global layer numbers) and ends."""
    layers: tuple[int, ...]
    pre_process: bool
    post_process: bool


@dataclass(frozen=True)
class ChunkTensor:
    local: str            # the name in the chunk's state dict
    key: str              # the whole-model key
    tensor: TensorSpec        # its row
    number: int | None    # the block's 1-based global layer number


def _holds(chunk: Chunk, tensor: TensorSpec) -> bool:
    return {"embedding": chunk.pre_process, "block": True, "final": chunk.post_process,
            "head": chunk.post_process and not chunk.pre_process}[tensor.part]


def chunk_tensors(chunk: Chunk, embed_layernorm: bool = True) -> list[ChunkTensor]:
    """Every parameter of a BloomModel chunk, in its state dict's order."""
    blocks = [t for t in TABLE if t.part == "block"]
    out = []
    for tensor in TABLE:
        if tensor is blocks[0]:
            out += [ChunkTensor(t.ours.format(i=i), t.key(number), t, number)
                    for i, number in enumerate(chunk.layers) for t in blocks]
        elif tensor.part != "block" and _holds(chunk, tensor) and \
                (embed_layernorm or tensor not in EMBEDDING_LAYERNORM):
            out.append(ChunkTensor(tensor.ours, tensor.key(), tensor, None))
    return out


def whole_model(num_layers: int, embed_layernorm: bool = True) -> list[ChunkTensor]:
    """Every tensor of the model on one stage (no head copy), in the model's order."""
    return chunk_tensors(Chunk(tuple(range(1, num_layers + 1)), True, True), embed_layernorm)


def to_global(local: str, chunk: Chunk) -> str:
    """A chunk's parameter name -> its whole-model key."""
    tensor, index = parse_ours(local, chunk.pre_process)
    return tensor.key(None if index is None else chunk.layers[index])


def target_names(chunk: Chunk, present: Iterable[str]) -> list[tuple[str, str]]:
    """(chunk-local name, whole-model key) of each parameter of `chunk` whose key is in
    `present` (the word embeddings always), in model order."""
    present = set(present)
    return [(c.local, c.key) for c in chunk_tensors(chunk)
            if c.key in present or c.tensor in (WORD_EMBEDDINGS, HEAD_COPY)]


# --------------------------------------------------------------------- Megatron's nesting
def megatron_path(local: str, pre_process: bool) -> tuple[str, ...]:
    """A chunk's parameter name -> its path in Megatron's nested model state."""
    tensor, index = parse_ours(local, pre_process)
    return tensor.megatron_path(index)


def nest_model(flat: Iterable[tuple[str, object]], pre_process: bool) -> dict:
    """(chunk-local name, tensor) pairs -> Megatron's nested model state."""
    nested: dict = {}
    for name, value in flat:
        *path, leaf = megatron_path(name, pre_process)
        node = nested
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return nested


def _leaves(nested: dict, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for key, value in nested.items():
        if isinstance(value, dict):
            yield from _leaves(value, path + (key,))
        else:
            yield path + (key,), value


def local_name(path: tuple[str, ...]) -> str | None:
    """A path in Megatron's nested model state -> the chunk-local parameter name (None: no
    BLOOM parameter)."""
    for patterns, tensor in _MEGATRON:
        if len(patterns) == len(path):
            matches = [p.fullmatch(key) for p, key in zip(patterns, path)]
            if all(matches):
                numbers = [n for n in map(_number, matches) if n is not None]
                return tensor.ours.format(i=numbers[0] if numbers else None)
    return None


def flatten_model(nested: dict, where: str) -> dict:
    """Megatron-nested model state -> {chunk-local parameter name: tensor}."""
    flat = {}
    for path, value in _leaves(nested):
        local = local_name(path)
        if local is None:
            raise ReshardError(f"{where}: unexpected entry {'.'.join(path)} in the model state")
        if local in flat:
            raise ReshardError(f"{where}: both an embedding and word_embeddings_for_head")
        flat[local] = value
    return flat
