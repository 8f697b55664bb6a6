"""How many processes a `datasets.map` of the data layer runs in (`preprocessing_num_workers`).

    num_proc = map_workers(config.preprocessing_num_workers, len(dataset), row_wise=True)   # None: this process

Set, the key is used as given. Unset, a map whose every output row depends on one input row only (converting,
measuring media, tokenizing sft, pairwise and prompt samples) starts a worker for every `ROWS_PER_WORKER` rows, up
to one per core this process may use. Workers cut the data into contiguous shards, and such a map gives the same rows
whatever the cut, so the default changes neither the tokens nor the cache key (which holds the key as set). A map
whose rows depend on their neighbours in a batch (pt's chunks, kto's KL pairs, packing: `row_wise=False`) would give
other rows for another cut, so it keeps one process unless the key asks for more.
"""

import os

#: A worker pays for its start-up (a forked process that unpickles the tokenizer, template and config: about a
#: second for Qwen's 151k vocabulary) only with this many rows to tokenize; below, one process is faster, its
#: tokenizer's threads already sharing each batch's texts over the cores. On 2 cores, 2 workers overtake one process
#: between 15,000 and 20,000 samples (benchmarks/README.md, `tokenize_speed.py --sizes`).
ROWS_PER_WORKER = 10_000


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one, as under taskset or a cgroup)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def map_workers(requested: int | None, rows: int, row_wise: bool = True) -> int | None:
    """`num_proc` of a map over `rows` rows: None (this process) or a worker count of at least 2."""
    if requested is None:
        requested = min(available_cores(), rows // ROWS_PER_WORKER) if row_wise else 1
    workers = min(requested, rows)
    return workers if workers > 1 else None
