"""Tokenizing speed: tunelab's whole data step against the tokenizer alone on the same texts and the same cores, and
against LLaMA-Factory. 50,000 alpaca-style samples, the Qwen2.5 tokenizer, `template: qwen`, stage sft, cutoff_len
1024. Results and the method are in benchmarks/README.md.

    .venv/bin/python benchmarks/tokenize_speed.py                       # on 1 core and on every core, best of 3
    .venv/bin/python benchmarks/tokenize_speed.py --samples 5000 --repeat 1    # a quick look
    .venv/bin/python benchmarks/tokenize_speed.py --llamafactory /tmp/lfvenv/bin/python   # LLaMA-Factory's venv
    .venv/bin/python benchmarks/tokenize_speed.py --sizes 2000,5000,10000,20000,50000    # where workers pay off

Each measurement runs in a fresh process pinned to the cores of its row (its CPU affinity, which the tokenizer's
threads and tunelab's default worker count both follow), with TOKENIZERS_PARALLELISM unset, as a user runs it. Rows
per core count:

* tokenizer alone: the Rust tokenizer's batch calls, 1000 texts per call as the data step makes them, on exactly the
  texts the template renders (rendered before the timing), with the tokenizer's threads on those cores. Ids only
  (`encode_batch_fast`): what the data step calls for a byte-level tokenizer such as this one, which it cuts at the
  piece borders by the tokens' lengths in bytes; no data step tokenizes these texts faster there, so this is the
  ceiling. Ids and character spans (`encode_batch`): what the data step calls for other fast tokenizers (and called
  for all of them before 2026-12-07, 18:00, when it was the ceiling of the tables in benchmarks/README.md).
* tunelab, defaults: the whole data step of a training run from a cold cache (a new `cache_dir`, so neither
  `datasets` nor tunelab has anything cached): read the json, convert, validate, tokenize, mask, measure and save
  the cache entry (`load_datasets`), `preprocessing_num_workers` unset. Its share of the ids-only rate is the
  figure of issue 15 (goal: 85%). The same config once more in the same process times the warm cache.
* tunelab, the other use of several cores: one worker per core when the default keeps one process, one process
  (the tokenizer's threads) when the default starts workers.
* tunelab's processors alone on converted rows, in batches of 1000 (tokenizing and masking without `datasets`, the
  collector paused per batch as in the data step).
* LLaMA-Factory (`--llamafactory`, or /tmp/lfvenv/bin/python when it exists): `llamafactory.data.get_dataset`, one
  process and one worker per core. It runs in its own virtual environment (it pins other versions of transformers
  and datasets); this same file runs there as the child process. LLaMA-Factory 0.9.5 imports torchaudio at import
  time, for which no build matches the CPU torch here; the text path never calls it, so the child gets an empty
  `torchaudio` module on its path (a folder this script writes into its temp dir).

The rate is samples per second of wall time, the best of `--repeat` rounds; a round runs every row once, so the load
of anything else on the machine falls on all rows alike (the load average at the start of each round is printed).
Both tools' children import `datasets` before the clock starts. `--sizes` instead times tunelab with one process and
with one worker per core on every core, for each dataset size: where workers start to pay for their start-up
(tunelab's `workers.ROWS_PER_WORKER`).

The tokenizer comes from ../shared/tokenizers/qwen2.5-instruct (see SOURCES.md there).
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "qwen2.5-instruct"
CUTOFF_LEN = 1024

# Common English words, most frequent first; drawn with a Zipf-like law so the text tokenizes like prose.
WORDS = """the of and to a in is that for it as with was on be by this are or from at an which have not but you
they we his her can will one all would there their what so up out if about who get make when more time year people
way day man thing woman life child world school state family student group country problem hand part place case
week company system program question work government number night point home water room mother area money story
fact month lot right study book eye job word business issue side kind head house service friend father power hour
game line end member law car city community name president team minute idea kid body information back parent face
others level office door health person art war history party result change morning reason research girl guy moment
air teacher force education function variable example algorithm data model training network language python code
list value string return error simple important different following possible available general specific however
therefore because although""".split()


def prose(rng: random.Random, words: int) -> str:
    out: list[str] = []
    for i in range(words):
        word = WORDS[min(int(rng.paretovariate(1.1)) - 1, len(WORDS) - 1)] if rng.random() < 0.9 \
            else str(rng.randint(0, 2024))
        if i == 0 or out[-1].endswith("."):
            word = word.capitalize()
        if rng.random() < 0.08:
            word += "."
        elif rng.random() < 0.05:
            word += ","
        out.append(word)
    return " ".join(out)


def words(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    """A log-normal word count: most texts near the median, a long tail up to `cap`."""
    return max(1, min(cap, int(rng.lognormvariate(math.log(median), sigma))))


def make_data(folder: Path, samples: int, seed: int = 0) -> Path:
    """Alpaca-style rows shaped like the Alpaca set: a short instruction (median 14 words), an input in 40% of the
    rows (median 20 words) and a response of median 80 words with a tail to 900 (some exceed cutoff_len)."""
    rng = random.Random(seed)
    rows = [{"instruction": prose(rng, words(rng, 14, 0.5, 120)),
             "input": prose(rng, words(rng, 20, 0.8, 300)) if rng.random() < 0.4 else "",
             "output": prose(rng, words(rng, 80, 0.9, 900))} for _ in range(samples)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}))
    return folder


def tunelab_child(data_dir: Path, workers: int, scratch: Path) -> dict:
    """The data step of a tunelab run, cold then warm, timed in this process (`workers` 0: the key unset)."""
    import datasets  # noqa: F401  imported before the clock starts, as the LLaMA-Factory child imports it
    from transformers import AutoTokenizer

    from tunelab.config import load_config
    from tunelab.data import get_template, load_datasets

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = load_config({"model_name_or_path": str(TOKENIZER), "dataset": "bench", "dataset_dir": str(data_dir),
                          "template": "qwen", "cutoff_len": CUTOFF_LEN, "cache_dir": str(scratch / "cache"),
                          "preprocessing_num_workers": workers or None})
    template = get_template(config, tokenizer)
    template.prepare_tokenizer(tokenizer)
    times = []
    for _ in ("cold", "warm"):
        start = time.perf_counter()
        splits = load_datasets(config, tokenizer, template)
        times.append(time.perf_counter() - start)
    stats = splits.reports[0].tokens
    return {"seconds": times[0], "warm_seconds": times[1], "rows": len(splits.train),
            "tokens": f"{stats.tokens / stats.rows:.0f} tokens per sample (p50 {stats.lengths['p50']}, p99 "
                      f"{stats.lengths['p99']}, after the cut), {stats.trained / stats.tokens:.1%} trained"}


def bench_rows(data_dir: Path) -> tuple[Any, Any, Any, list[list[dict]]]:
    """The tokenizer, the prepared `qwen` template, its config and the benchmark's conversations."""
    from transformers import AutoTokenizer

    from tunelab.config import load_config
    from tunelab.data import get_template

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = load_config({"model_name_or_path": str(TOKENIZER), "template": "qwen", "cutoff_len": CUTOFF_LEN})
    template = get_template(config, tokenizer)
    template.prepare_tokenizer(tokenizer)
    rows = [[{"role": "user", "content": "\n".join(p for p in (r["instruction"], r["input"]) if p)},
             {"role": "assistant", "content": r["output"]}] for r in json.loads((data_dir / "bench.json").read_text())]
    return tokenizer, template, config, rows


def processor_child(data_dir: Path, workers: int, scratch: Path) -> dict:
    """The sft processor alone on converted rows, in batches of 1000: tokenizing and masking without `datasets`,
    with the garbage collector paused for each batch as in the data step."""
    from tunelab.data.gc_paused import gc_paused
    from tunelab.data.processing import PROCESSORS

    tokenizer, template, config, rows = bench_rows(data_dir)
    process = gc_paused(PROCESSORS["sft"])   # as the data step's map functions run it
    start = time.perf_counter()
    for i in range(0, len(rows), 1000):
        part = rows[i:i + 1000]
        process({"messages": part, "system": [None] * len(part), "tools": [None] * len(part)},
                tokenizer=tokenizer, template=template, config=config)
    return {"seconds": time.perf_counter() - start, "rows": len(rows)}


def ceiling_child(data_dir: Path, workers: int, scratch: Path) -> dict:
    """The tokenizer alone on the texts the template renders (rendered first, untimed), in batches of 1000: ids only
    (`encode_batch_fast`, what the data step calls for a byte-level tokenizer) and with character spans
    (`encode_batch`, what it calls for other fast tokenizers)."""
    tokenizer, template, _, rows = bench_rows(data_dir)
    texts = ["".join(template.render_pieces(tokenizer, messages, None, None)) for messages in rows]
    backend = tokenizer.backend_tokenizer
    seconds = {}
    for call in ("encode_batch", "encode_batch_fast"):
        encode = getattr(backend, call)
        start = time.perf_counter()
        for i in range(0, len(texts), 1000):
            [encoding.ids for encoding in encode(texts[i:i + 1000], add_special_tokens=False)]
        seconds[call] = time.perf_counter() - start
    return {"seconds": seconds["encode_batch"], "fast_seconds": seconds["encode_batch_fast"], "rows": len(texts)}


def llamafactory_child(data_dir: Path, workers: int, scratch: Path) -> dict:
    """The data step of a LLaMA-Factory run (run inside its environment), timed in this process."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import AutoTokenizer, Seq2SeqTrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    data_args = DataArguments(dataset="bench", dataset_dir=str(data_dir), template="qwen", cutoff_len=CUTOFF_LEN,
                              preprocessing_num_workers=workers if workers > 1 else None, overwrite_cache=True)
    model_args = ModelArguments(model_name_or_path=str(TOKENIZER), cache_dir=str(scratch / "cache"))
    args = Seq2SeqTrainingArguments(output_dir=str(scratch / "out"), use_cpu=True)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    start = time.perf_counter()
    module = get_dataset(template, model_args, data_args, args, stage="sft", tokenizer=tokenizer)
    return {"seconds": time.perf_counter() - start, "rows": len(module["train_dataset"])}


CHILDREN = {"tunelab": tunelab_child, "processors": processor_child, "ceiling": ceiling_child,
            "llamafactory": llamafactory_child}
LLAMAFACTORY_STUB = '"""Empty stand-in: LLaMA-Factory imports torchaudio at import time; text data never uses it."""\n'
LFVENV = Path("/tmp/lfvenv/bin/python")


def run_child(python: str, kind: str, data_dir: Path, workers: int, cores: int, scratch: Path) -> dict:
    """One measurement in a fresh process pinned to the first `cores` cores, with a fresh cache folder."""
    env = {key: value for key, value in os.environ.items() if key != "TOKENIZERS_PARALLELISM"}
    if kind == "llamafactory":
        stub = scratch / "stub"
        (stub / "torchaudio").mkdir(parents=True, exist_ok=True)
        (stub / "torchaudio" / "__init__.py").write_text(LLAMAFACTORY_STUB)
        env["PYTHONPATH"] = str(stub)
    folder = Path(tempfile.mkdtemp(dir=scratch))
    out = subprocess.run([python, __file__, "--child", kind, str(data_dir), str(workers), str(folder), str(cores)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{kind} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rate(run: dict) -> float:
    return run["rows"] / run["seconds"]


def in_turns(repeat: int, rows: list[tuple], data_dir: Path, cores: int, scratch: Path) -> tuple[dict, list[float]]:
    """The fastest of `repeat` runs of each row (python, kind, workers), run in rounds of one run per row so that the
    load of other processes falls on every row alike; and the load average at the start of each round."""
    runs: dict[tuple, list[dict]] = {row: [] for row in rows}
    loads = []
    for _ in range(repeat):
        loads.append(os.getloadavg()[0])
        for python, kind, workers in rows:
            runs[(python, kind, workers)].append(run_child(python, kind, data_dir, workers, cores, scratch))
    return {row: min(done, key=lambda run: run["seconds"]) for row, done in runs.items()}, loads


def compare(args: argparse.Namespace, data_dir: Path, scratch: Path, cores: int, llamafactory: str | None) -> None:
    """Every row on the first `cores` cores."""
    from tunelab.data.workers import ROWS_PER_WORKER

    default_workers = min(cores, args.samples // ROWS_PER_WORKER)
    rows = [("tokenizer alone: encode_batch_fast, ids only (the ceiling)", sys.executable, "ceiling", 0),
            (f"tunelab, defaults ({f'{default_workers} workers' if default_workers > 1 else '1 process'})",
             sys.executable, "tunelab", 0)]
    if cores > 1:
        other = cores if default_workers <= 1 else 1
        rows.append((f"tunelab, preprocessing_num_workers: {other}", sys.executable, "tunelab", other))
    rows.append(("tunelab, processors alone (no datasets)", sys.executable, "processors", 0))
    if llamafactory:
        rows.append(("LLaMA-Factory 0.9.5, 1 process", llamafactory, "llamafactory", 1))
        if cores > 1:
            rows.append((f"LLaMA-Factory 0.9.5, {cores} workers", llamafactory, "llamafactory", cores))
    best, loads = in_turns(args.repeat, [row[1:] for row in rows], data_dir, cores, scratch)
    print(f"\n--- {cores} core(s); load average at the start of each round: {', '.join(f'{x:.2f}' for x in loads)}")
    ceiling = best[rows[0][1:]]
    ids_only, with_spans = ceiling["rows"] / ceiling["fast_seconds"], ceiling["rows"] / ceiling["seconds"]
    print(f"{rows[0][0]:64} {ids_only:7.0f} samples/s ({ceiling['fast_seconds']:.1f} s)")
    print(f"{'tokenizer alone: encode_batch, ids and spans':64} {with_spans:7.0f} samples/s")
    for label, *row in rows[1:]:
        run = best[tuple(row)]
        warm = f", warm cache {run['warm_seconds']:.2f} s" if "warm_seconds" in run else ""
        print(f"{label:64} {rate(run):7.0f} samples/s = {rate(run) / ids_only:4.0%} of the ceiling, "
              f"{rate(run) / with_spans:4.0%} of encode_batch ({run['seconds']:.1f} s{warm})")
    print(f"    tunelab's rows: {best[rows[1][1:]]['tokens']}")


def sizes(args: argparse.Namespace, scratch: Path, cores: int) -> None:
    """One process against one worker per core, on every core, for each dataset size (in turns, as `compare`)."""
    print(f"tunelab, defaults but preprocessing_num_workers, on {cores} cores; best of {args.repeat}")
    for size in (int(size) for size in args.sizes.split(",")):
        data_dir = make_data(scratch / f"data{size}", size)
        rows = [(sys.executable, "tunelab", 1), (sys.executable, "tunelab", cores)]
        best, loads = in_turns(args.repeat, rows, data_dir, cores, scratch)
        one, many = (best[row]["seconds"] for row in rows)
        print(f"{size:7} samples: 1 process {one:6.2f} s, {cores} workers {many:6.2f} s ({one / many:.2f}x; load "
              f"{', '.join(f'{x:.2f}' for x in loads)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the best is reported")
    parser.add_argument("--llamafactory", metavar="PYTHON", help="the python of a venv with llamafactory installed "
                                                                 f"(default: {LFVENV} when it exists)")
    parser.add_argument("--sizes", help="comma list of dataset sizes: time 1 process against 1 worker per core")
    parser.add_argument("--child", nargs=5, metavar=("KIND", "DATA_DIR", "WORKERS", "SCRATCH", "CORES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, data_dir, workers, scratch, cores = args.child
        # Before anything starts threads: the tokenizer's thread pool and the default worker count follow it.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:int(cores)])
        print(json.dumps(CHILDREN[kind](Path(data_dir), int(workers), Path(scratch))))
        return

    scratch = Path(tempfile.mkdtemp(prefix="tokenize_speed_"))
    cores = len(os.sched_getaffinity(0))
    if args.sizes:
        sizes(args, scratch, cores)
        return
    llamafactory = args.llamafactory or (str(LFVENV) if LFVENV.exists() else None)
    data_dir = make_data(scratch / "data", args.samples)
    print(f"{args.samples} samples ({(data_dir / 'bench.json').stat().st_size / 1e6:.1f} MB of json), tokenizer "
          f"qwen2.5-instruct, template qwen, cutoff_len {CUTOFF_LEN}, best of {args.repeat}")
    for count in sorted({1, cores}):
        compare(args, data_dir, scratch, count, llamafactory)


if __name__ == "__main__":
    main()
