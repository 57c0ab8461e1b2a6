"""Concatenate several mmap `.bin/.idx` datasets into one (Megatron's tools/merge_datasets.py).

    python tools/merge_datasets.py --input data/part-a_text_document data/parts/ \
        --output-prefix data/all_text_document

Each --input is a dataset prefix (`P` for `P.bin` + `P.idx`) or a directory, which stands for
every complete pair in it, in name order. Documents keep their order: the inputs' in the order
given. Every input must hold the same token dtype (the same tokenizer). The output appears under
its final name only once complete. Progress (bytes copied, rate, time left) goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

if __package__ in (None, ""):  # run as `python tools/merge_datasets.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.errors import error_line  # noqa: E402
from ascendspeed.progress import NoProgress, Progress  # noqa: E402
from megatron_ext.indexed_dataset import (IndexedDatasetError, MMapIndexedDataset,  # noqa: E402
                                          MMapIndexedDatasetBuilder, data_file_path, dataset_exists,
                                          index_file_path)


def expand_inputs(inputs, output_prefix: str) -> list[str]:
    """Dataset prefixes named by `inputs` (prefixes or directories), in order."""
    output = os.path.abspath(output_prefix)
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            names = sorted(name[:-len(".idx")] for name in os.listdir(item) if name.endswith(".idx"))
            found = [os.path.join(item, name) for name in names
                     if os.path.abspath(os.path.join(item, name)) != output]
            found = [p for p in found if os.path.exists(data_file_path(p))]
            if not found:
                raise IndexedDatasetError(f"--input {item}: directory holds no .bin/.idx pair")
            prefixes.extend(found)
        elif dataset_exists(item):
            prefixes.append(item)
        else:
            raise IndexedDatasetError(f"--input {item}: neither a directory nor a dataset prefix "
                                      f"({index_file_path(item)} and {data_file_path(item)} must exist)")
    return prefixes


def merge(prefixes, output_prefix: str, progress=NoProgress) -> dict:
    """Write the concatenation of `prefixes` to `output_prefix`; returns counts. `progress`: a
    factory as ascendspeed.progress's, shown the bytes copied."""
    if not prefixes:
        raise IndexedDatasetError("nothing to merge")
    datasets = [MMapIndexedDataset(p) for p in prefixes]  # validates every pair before writing
    dtypes = {p: np.dtype(d.dtype) for p, d in zip(prefixes, datasets)}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{p} ({dt})" for p, dt in dtypes.items())
        raise IndexedDatasetError(f"cannot merge datasets of different token dtypes: {listing}; "
                                  f"they were made with different tokenizers")
    counts = {"datasets": len(prefixes), "sequences": sum(len(d) for d in datasets),
              "documents": sum(len(d.doc_idx) - 1 for d in datasets),
              "tokens": sum(int(d.sizes.sum(dtype=np.int64)) for d in datasets)}
    del datasets
    parent = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(parent, exist_ok=True)
    builder = MMapIndexedDatasetBuilder(data_file_path(output_prefix), dtype=dtypes[prefixes[0]])
    sizes = [os.path.getsize(data_file_path(p)) for p in prefixes]
    with builder, progress(sum(sizes), "merge", "B") as bar:  # the builder aborts on any error
        for k, (prefix, size) in enumerate(zip(prefixes, sizes), start=1):
            builder.merge_file_(prefix)
            bar.update(size, detail=f"{k}/{len(prefixes)} datasets")
        builder.finalize(index_file_path(output_prefix))
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="dataset prefixes and/or directories of .bin/.idx pairs, in merge order")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    args = parser.parse_args(argv)
    try:
        prefixes = expand_inputs(args.input, args.output_prefix)
        counts = merge(prefixes, args.output_prefix, progress=Progress)
    except (IndexedDatasetError, OSError) as error:  # megatron_ext's errors: the format library's
        print(error_line(error), file=sys.stderr)
        return 2
    print(f"merged {counts['datasets']} datasets into {args.output_prefix}.{{bin,idx}}: "
          f"{counts['documents']} documents, {counts['sequences']} sequences, {counts['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
