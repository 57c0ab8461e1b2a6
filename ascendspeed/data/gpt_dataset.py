"""Megatron's GPT dataset: samples of seq_length + 1 tokens cut from a shuffled, multi-epoch
stream of sequences, with doc_idx / sample_idx / shuffle_idx equal to Megatron-DeepSpeed's bit for
bit (docs/data.md walks through the construction and the contracts that pin it).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ascendspeed.data import index_cache, index_helpers
from ascendspeed.errors import DatasetError
from ascendspeed.progress import NoProgress
from megatron_ext.indexed_dataset import MMapIndexedDataset

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
BIGSCIENCE_CUTOFF_LAST_EPOCH = 0.95  # the fork that trained BLOOM
MEGATRON_LM_CUTOFF_LAST_EPOCH = 0.80  # NVIDIA Megatron-LM, Microsoft Megatron-DeepSpeed, AscendSpeed 2023


# ---------------------------------------------------------------------------------- splits
def parse_split_string(splits_string: str) -> list[float]:
    """'969, 30, 1' (or '90/8/2', or '100') -> three fractions summing to 1."""
    separator = "," if "," in splits_string else "/" if "/" in splits_string else None
    pieces = splits_string.split(separator) if separator else [splits_string]
    try:
        splits = [float(piece) for piece in pieces]
    except ValueError:
        raise DatasetError(f"--split {splits_string!r}: expected up to three numbers such as "
                                 f"'969, 30, 1'") from None
    if any(s < 0 or math.isnan(s) for s in splits):
        raise DatasetError(f"--split {splits_string!r}: proportions must be >= 0")
    splits = (splits + [0.0, 0.0, 0.0])[:3]
    total = sum(splits)
    if not total > 0.0:
        raise DatasetError(f"--split {splits_string!r}: proportions sum to 0")
    return [split / total for split in splits]


def get_train_valid_test_split_(splits_string: str, size: int) -> list[int]:
    """Document boundaries [0, a, b, size] by Megatron's legacy rule: round each share, then move
    the whole rounding error onto the train split."""
    splits = parse_split_string(splits_string)
    splits_index = [0]
    for split in splits:
        splits_index.append(splits_index[-1] + int(round(split * float(size))))
    diff = splits_index[-1] - size
    for index in range(1, len(splits_index)):
        splits_index[index] -= diff
    assert len(splits_index) == 4 and splits_index[-1] == size
    return splits_index


def get_split_by_range_(range_string: str, size: int) -> list[int]:
    """'START:END' fractions -> [round(START*size), round(END*size)] (BigScience option 2)."""
    try:
        start, end = (float(piece) for piece in range_string.split(":"))
    except ValueError:
        raise DatasetError(f"range {range_string!r}: expected START:END, e.g. 0:0.95") from None
    if not (0.0 <= start < end <= 1.0):
        raise DatasetError(f"range {range_string!r}: need 0 <= START < END <= 1")
    return [round(start * float(size)), round(end * float(size))]


# ---------------------------------------------------------------------------------- index plan
@dataclass(frozen=True)
class IndexPlan:
    """The cheap numbers that decide the arrays (and the error messages when they cannot exist)."""
    tokens_per_epoch: int
    num_epochs: int
    separate_last_epoch: bool
    num_samples_from_epochs_minus_one: int  # samples that fit in the first E - 1 epochs
    total_samples: int  # len(dataset) = rows of sample_idx - 1


def plan_index_mappings(tokens_per_epoch: int, num_samples: int, seq_length: int,
                        cutoff_last_epoch: float, where: str) -> IndexPlan:
    if num_samples < 0:
        raise DatasetError(f"{where}: negative sample count {num_samples}")
    if tokens_per_epoch <= 0 and num_samples > 0:
        raise DatasetError(
            f"{where}: its documents hold no tokens, so it cannot give the {num_samples} samples "
            f"asked for; give this split documents (--split) or request no samples from it")
    # Smallest E >= 1 with floor((E*T - 1) / L) >= num_samples (one token is shared by neighbours).
    num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch)) if num_samples else 1
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length if tokens_per_epoch else 0
    if num_epochs == 1:
        return IndexPlan(tokens_per_epoch, 1, False, 0, total_samples)
    samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    last_epoch_samples = num_samples - samples_before_last
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    if samples_per_epoch == 0:
        raise DatasetError(
            f"{where}: one epoch holds {tokens_per_epoch} tokens, less than one sample of "
            f"--seq-length + 1 = {seq_length + 1} tokens, so {num_samples} samples cannot be cut "
            f"from it; use a shorter --seq-length, give this split more documents (--split), or "
            f"request fewer samples (--train-samples/--train-iters/--eval-iters)")
    # BigScience asserts last <= per_epoch; the boundary case last == per_epoch + 1 (NVIDIA
    # issue #176, NeMo #6513) is allowed as Megatron-LM core does: it is never separated.
    assert 0 <= last_epoch_samples <= samples_per_epoch + 1, (where, last_epoch_samples)
    separate = last_epoch_samples < int(cutoff_last_epoch * samples_per_epoch)
    return IndexPlan(tokens_per_epoch, num_epochs, separate, samples_before_last, total_samples)


def compute_index_mappings(documents: np.ndarray, sizes: np.ndarray, plan: IndexPlan,
                           seq_length: int, seed: int, bar=None) -> dict[str, np.ndarray]:
    """doc_idx, sample_idx and shuffle_idx exactly as Megatron-DeepSpeed builds them. `bar` (an
    ascendspeed.progress bar) is given each array's entries once it is built."""
    bar = bar or NoProgress()
    bar.update(0, detail="shuffling doc_idx")
    rng = np.random.RandomState(seed=seed)
    documents = np.asarray(documents, dtype=np.int32)
    # Epoch-major copies of the documents. Separated, the first E-1 epochs and the last one are
    # shuffled apart (two draws, as Megatron's concatenation of two arrays); shuffling views in
    # place gives the same values without the concatenated copy.
    doc_idx = np.tile(documents, plan.num_epochs)
    if plan.separate_last_epoch:
        cut = (plan.num_epochs - 1) * len(documents)
        index_helpers.shuffle(rng, doc_idx[:cut])
        index_helpers.shuffle(rng, doc_idx[cut:])
    else:
        index_helpers.shuffle(rng, doc_idx)
    bar.update(len(doc_idx), detail="building sample_idx")
    sample_idx = index_helpers.build_sample_idx(sizes, doc_idx, seq_length, plan.total_samples)
    bar.update(len(sample_idx), detail="shuffling shuffle_idx")
    # Sample order: one shuffle of all samples, or, separated, the partial last epoch shuffled on
    # its own and consumed last. uint32 unless the count needs int64 (Megatron's rule).
    total = plan.total_samples
    dtype = np.int64 if total >= np.iinfo(np.uint32).max - 1 else np.uint32
    shuffle_idx = np.arange(total, dtype=dtype)
    first = plan.num_samples_from_epochs_minus_one if plan.separate_last_epoch else total
    index_helpers.shuffle(rng, shuffle_idx[:first])
    if first < total:
        index_helpers.shuffle(rng, shuffle_idx[first:])
    bar.update(total)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


def _check_megatron_cache(arrays, documents: np.ndarray, plan: IndexPlan) -> str | None:
    """Consistency of a cache that has no sidecar with the data and decision we have now."""
    doc_idx, sample_idx, shuffle_idx = (arrays[a] for a in index_cache.ARRAY_NAMES)
    expected_docs = plan.num_epochs * len(documents)
    if doc_idx.shape != (expected_docs,):
        return f"doc_idx holds {doc_idx.shape} entries, expected {expected_docs}"
    if sample_idx.shape != (plan.total_samples + 1, 2):
        return f"sample_idx has shape {sample_idx.shape}, expected {(plan.total_samples + 1, 2)}"
    if shuffle_idx.shape != (plan.total_samples,):
        return f"shuffle_idx holds {shuffle_idx.shape} entries, expected {plan.total_samples}"
    if len(doc_idx) and (doc_idx.min() < documents[0] or doc_idx.max() > documents[-1]):
        return "doc_idx refers to sequences outside this split"
    if plan.num_epochs > 1 and plan.total_samples > plan.num_samples_from_epochs_minus_one > 0:
        tail_min = int(np.min(shuffle_idx[plan.num_samples_from_epochs_minus_one:]))
        if plan.separate_last_epoch != (tail_min >= plan.num_samples_from_epochs_minus_one):
            return "its last epoch was (not) shuffled separately: built with another cutoff"
    return None


# ---------------------------------------------------------------------------------- dataset
class GPTDataset(torch.utils.data.Dataset):
    """Samples `{'text': int64[seq_length + 1]}` of one split of one indexed dataset."""

    def __init__(self, name: str, data_prefix: str, documents: np.ndarray,
                 indexed_dataset: MMapIndexedDataset, num_samples: int, seq_length: int, seed: int,
                 *, cutoff_last_epoch: float = BIGSCIENCE_CUTOFF_LAST_EPOCH,
                 data_cache_path: str | None = None, build_group=None, progress=NoProgress):
        self.name = name
        self.indexed_dataset = indexed_dataset
        self.seq_length = seq_length
        documents = np.asarray(documents, dtype=np.int32)
        if len(documents) == 0 or documents[0] < 0 or documents[-1] >= len(indexed_dataset.sizes):
            raise DatasetError(f"{data_prefix}: {name} documents must be a non-empty range "
                                     f"of the dataset's {len(indexed_dataset.sizes)} sequences")
        self.doc_idx, self.sample_idx, self.shuffle_idx = build_index_mappings(
            name, data_prefix, documents, indexed_dataset.sizes, num_samples, seq_length, seed,
            cutoff_last_epoch=cutoff_last_epoch, data_cache_path=data_cache_path,
            build_group=build_group, progress=progress)

    def __len__(self) -> int:
        # Megatron: sample_idx.shape[0] - 1 (shuffle_idx may be shorter only in theory).
        return self.sample_idx.shape[0] - 1

    def __getitem__(self, idx) -> dict[str, np.ndarray]:
        if not 0 <= idx < len(self):
            raise IndexError(f"{self.name} sample {idx} out of range [0, {len(self)})")
        idx = self.shuffle_idx[idx]
        doc_index_f, offset_f = (int(v) for v in self.sample_idx[idx])
        doc_index_l, offset_l = (int(v) for v in self.sample_idx[idx + 1])
        get = self.indexed_dataset.get
        if doc_index_f == doc_index_l:
            sample = get(self.doc_idx[doc_index_f], offset=offset_f, length=offset_l - offset_f + 1)
        else:
            parts = [get(self.doc_idx[doc_index_f], offset=offset_f)]
            parts += [get(self.doc_idx[i]) for i in range(doc_index_f + 1, doc_index_l)]
            parts.append(get(self.doc_idx[doc_index_l], length=offset_l + 1))
            sample = np.concatenate(parts)
        return {"text": np.array(sample, dtype=np.int64)}


def build_index_mappings(name: str, data_prefix: str, documents: np.ndarray, sizes: np.ndarray,
                         num_samples: int, seq_length: int, seed: int, *,
                         cutoff_last_epoch: float = BIGSCIENCE_CUTOFF_LAST_EPOCH,
                         data_cache_path: str | None = None, build_group=None,
                         progress=NoProgress):
    """(doc_idx, sample_idx, shuffle_idx), from the cache when it is valid, else built (and cached
    by one process per node) — every process in `build_group` must call this together.
    `progress` (a factory, ascendspeed.progress) is shown the entries built and written."""
    where = f"{data_prefix}: {name} split (sequences [{documents[0]}, {documents[-1] + 1}))"
    split_sizes = sizes[documents[0]:documents[-1] + 1]
    plan = plan_index_mappings(int(split_sizes.sum(dtype=np.int64)), num_samples, seq_length,
                               cutoff_last_epoch, where)
    identity = index_cache.IndexIdentity(
        first_document=int(documents[0]), end_document=int(documents[-1]) + 1,
        sizes_digest=index_cache.sizes_digest(split_sizes), tokens_per_epoch=plan.tokens_per_epoch,
        num_epochs=plan.num_epochs, separate_last_epoch=plan.separate_last_epoch,
        cutoff_last_epoch=float(cutoff_last_epoch))
    paths = index_cache.cache_paths(data_prefix, name, num_samples, seq_length, seed, data_cache_path)

    def check(arrays):
        return _check_megatron_cache(arrays, documents, plan)

    entries = plan.num_epochs * len(documents) + 2 * plan.total_samples + 1  # of the 3 arrays
    what = f"{name} index of {os.path.basename(data_prefix)}"

    def build():
        if index_cache.load_cached(paths, identity, check) is not None:
            return
        start = time.time()
        with progress(2 * entries, what, "entries") as bar:  # built, then written
            arrays = compute_index_mappings(documents, sizes, plan, seq_length, seed, bar)
            bar.update(0, detail="writing the cache")
            index_cache.save_atomically(paths, arrays, identity, saved=bar.update)
        logger.info(" > built %s index mappings in %.2f s: %d epochs, %d samples, last epoch %s",
                    name, time.time() - start, plan.num_epochs, plan.total_samples,
                    "shuffled separately" if plan.separate_last_epoch else "mixed in")

    if not index_cache.is_writable_dir(paths["doc_idx"]):
        logger.warning(" > cannot write index caches next to %s; building them in memory "
                       "(give --data-cache-path to keep them)", data_prefix)
        with progress(entries, what, "entries") as bar:
            arrays = compute_index_mappings(documents, sizes, plan, seq_length, seed, bar)
    else:
        index_cache.run_on_one_process_per_node(build, group=build_group)
        arrays = index_cache.load_cached(paths, identity, check)
        if arrays is None:
            raise RuntimeError(f"index cache {paths['doc_idx']} missing after it was built; "
                               f"is the directory shared by the processes of a node?")
    logger.info("    %s: total number of samples %d, epochs %d", name, plan.total_samples,
                plan.num_epochs)
    return arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]
