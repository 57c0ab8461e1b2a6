"""A deliberately plain re-statement of Megatron's index construction (docs/data.md walks
through it) with numpy only: mgrid doc_idx, position-based sample_idx,
RandomState.shuffle, and the greedy blend. The fast implementation must agree with it exactly."""
import math

import numpy as np


def num_epochs(tokens_per_epoch, seq_length, num_samples):
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_length >= num_samples:
            return epochs


def doc_idx(documents, epochs, rng, separate):
    if not separate or epochs == 1:
        grid = np.mgrid[0:epochs, 0:len(documents)][1]
        grid[:] = documents
        out = grid.reshape(-1).astype(np.int32)
        rng.shuffle(out)
        return out
    return np.concatenate([doc_idx(documents, epochs - 1, rng, False),
                           doc_idx(documents, 1, rng, False)])


def sample_idx(sizes, doc_idx_, seq_length, num_samples):
    """Row i locates stream token i*L: (position j in doc_idx, offset in that sequence). Located
    directly (not walked), so a sample ending on a sequence's last token leaves the next row on
    that token, and zero-length sequences are never pointed at."""
    ends = np.cumsum(sizes[doc_idx_].astype(np.int64))
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    j = np.searchsorted(ends, positions, side="right")
    starts = ends[j] - sizes[doc_idx_][j]
    out = np.zeros((num_samples + 1, 2), dtype=np.int32)
    out[1:, 0] = j
    out[1:, 1] = positions - starts
    return out


def shuffle_idx(first, total, rng):
    dtype = np.int64 if total >= np.iinfo(np.uint32).max - 1 else np.uint32
    head = np.arange(0, first, dtype=dtype)
    rng.shuffle(head)
    if first == total:
        return head
    tail = np.arange(first, total, dtype=dtype)
    rng.shuffle(tail)
    return np.concatenate([head, tail])


def index_mappings(documents, sizes, num_samples, seq_length, seed, cutoff):
    tokens = int(np.sum(sizes[documents], dtype=np.int64))
    epochs = num_epochs(tokens, seq_length, num_samples)
    separate = False
    before_last = 0
    if epochs > 1:
        before_last = ((epochs - 1) * tokens - 1) // seq_length
        last = num_samples - before_last
        per_epoch = (tokens - 1) // seq_length
        assert 0 <= last <= per_epoch
        separate = last < int(cutoff * per_epoch)
    rng = np.random.RandomState(seed=seed)
    d = doc_idx(documents, epochs, rng, separate)
    total = (epochs * tokens - 1) // seq_length
    s = sample_idx(sizes, d, seq_length, total)
    sh = shuffle_idx(before_last if separate else total, total, rng)
    return d, s, sh


def split_boundaries(splits_string, size):
    if "," in splits_string:
        splits = [float(s) for s in splits_string.split(",")]
    elif "/" in splits_string:
        splits = [float(s) for s in splits_string.split("/")]
    else:
        splits = [float(splits_string)]
    while len(splits) < 3:
        splits.append(0.0)
    splits = splits[:3]
    total = sum(splits)
    splits = [s / total for s in splits]
    idx = [0]
    for s in splits:
        idx.append(idx[-1] + int(round(s * float(size))))
    diff = idx[-1] - size
    for i in range(1, len(idx)):
        idx[i] -= diff
    return idx


def blend_counts(weights, counts):
    weights = [float(w) for w in weights]
    total = 0.0
    for w in weights:
        total += w
    weights = [w / total for w in weights]
    return weights, [[int(math.ceil(v * w * 1.005)) for v in counts] for w in weights]


def blending_indices(weights, size):
    weights = np.array(weights, dtype=np.float64)
    weights /= np.sum(weights)
    index = np.zeros(size, dtype=np.uint8)
    sample = np.zeros(size, dtype=np.int64)
    current = [0] * len(weights)
    for s in range(size):
        x = max(float(s), 1.0)
        errors = [weights[i] * x - current[i] for i in range(len(weights))]
        best = 0
        for i in range(1, len(weights)):
            if errors[i] > errors[best]:
                best = i
        index[s] = best
        sample[s] = current[best]
        current[best] += 1
    return index, sample


def sample_tokens(token_arrays, doc_idx_, sample_idx_, shuffle_idx_, k, seq_length):
    """Sample k straight from the definition: stream tokens [i*L, i*L + L] of the doc_idx stream."""
    i = int(shuffle_idx_[k])
    first, offset = sample_idx_[i]
    parts, held, position = [], 0, int(first)
    while held < offset + seq_length + 1:
        parts.append(token_arrays[doc_idx_[position]])
        held += len(parts[-1])
        position += 1
    return np.concatenate(parts)[offset:offset + seq_length + 1].astype(np.int64)
