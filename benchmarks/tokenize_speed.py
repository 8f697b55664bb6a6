"""Tokenizing and masking speed: 50,000 alpaca-style samples, the Qwen2.5 tokenizer, `template: qwen`, stage sft,
cutoff_len 1024. Results and the method are in benchmarks/README.md.

    .venv/bin/python benchmarks/tokenize_speed.py                       # tunelab with 1 and 2 workers
    .venv/bin/python benchmarks/tokenize_speed.py --samples 5000 --repeat 1    # a quick look
    .venv/bin/python benchmarks/tokenize_speed.py --llamafactory /tmp/lfvenv/bin/python   # and LLaMA-Factory

Each measurement runs in a fresh process and times the whole data step of a training run from a cold cache (a new
`cache_dir`, so neither `datasets` nor tunelab has anything cached): read the json file, convert, validate,
tokenize, mask, and for tunelab also measure and save the cache entry. The rate is samples per second of that wall
time, the best of `--repeat` runs (the least disturbed by anything else on the machine). A tunelab row also times
the same config once more in the same process: the warm cache.

Rows differ in one thing each: the worker count (`preprocessing_num_workers`), or TOKENIZERS_PARALLELISM. With
`false`, N workers use N cores. With `true` (the library's default when a process has not forked), one batched
`encode_batch` call spreads its texts over every core from a single worker.

LLaMA-Factory runs in its own virtual environment (it pins other versions of transformers and datasets); this same
file runs there as the child process, and times `llamafactory.data.get_dataset`. LLaMA-Factory 0.9.5 imports
torchaudio at import time, for which no build matches the CPU torch here; the text path never calls it, so the child
gets an empty `torchaudio` module on its path (a folder this script writes into its temp dir).

The tokenizer comes from ../shared/tokenizers/qwen2.5-instruct (see SOURCES.md there). Run on a quiet machine: two
busy processes on 2 cores distort every number; the load average is printed with each row.
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
    """The data step of a tunelab run, cold then warm, timed in this process."""
    from transformers import AutoTokenizer

    from tunelab.config import load_config
    from tunelab.data import get_template, load_datasets

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = load_config({"model_name_or_path": str(TOKENIZER), "dataset": "bench", "dataset_dir": str(data_dir),
                          "template": "qwen", "cutoff_len": CUTOFF_LEN, "cache_dir": str(scratch / "cache"),
                          "preprocessing_num_workers": workers})
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


def processor_child(data_dir: Path, samples: int) -> dict:
    """The sft processor alone on converted rows, in this process: tokenization and masking without `datasets`."""
    from transformers import AutoTokenizer

    from tunelab.config import load_config
    from tunelab.data import get_template
    from tunelab.data.processing import PROCESSORS

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = load_config({"model_name_or_path": str(TOKENIZER), "template": "qwen", "cutoff_len": CUTOFF_LEN})
    template = get_template(config, tokenizer)
    template.prepare_tokenizer(tokenizer)
    rows = json.loads((data_dir / "bench.json").read_text())[:samples]
    conversations = [[{"role": "user", "content": "\n".join(p for p in (r["instruction"], r["input"]) if p)},
                      {"role": "assistant", "content": r["output"]}] for r in rows]
    start = time.perf_counter()
    for i in range(0, len(rows), 1000):
        part = conversations[i:i + 1000]
        PROCESSORS["sft"]({"messages": part, "system": [None] * len(part), "tools": [None] * len(part)},
                          tokenizer=tokenizer, template=template, config=config)
    return {"seconds": time.perf_counter() - start, "rows": len(rows)}


def tokenizer_alone(data_dir: Path, samples: int) -> dict:
    """The ceiling: the Rust tokenizer alone on the rendered conversations (the tokenizer's own chat template renders
    them, outside the timing), in batches of 1000, ids only. No data step can tokenize faster than this per core."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = json.loads((data_dir / "bench.json").read_text())[:samples]
    texts = tokenizer.apply_chat_template(
        [[{"role": "user", "content": "\n".join(p for p in (r["instruction"], r["input"]) if p)},
          {"role": "assistant", "content": r["output"]}] for r in rows], tokenize=False)
    start = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tokenizer(texts[i:i + 1000], add_special_tokens=False)
    return {"seconds": time.perf_counter() - start, "rows": len(rows)}


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


CHILDREN = {"tunelab": tunelab_child, "llamafactory": llamafactory_child}
LLAMAFACTORY_STUB = '"""Empty stand-in: LLaMA-Factory imports torchaudio at import time; text data never uses it."""\n'


def run_child(python: str, kind: str, data_dir: Path, workers: int, parallelism: str, scratch: Path) -> dict:
    """One measurement in a fresh process (and a fresh cache folder) with TOKENIZERS_PARALLELISM set."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": parallelism}
    if kind == "llamafactory":
        stub = scratch / "stub"
        (stub / "torchaudio").mkdir(parents=True, exist_ok=True)
        (stub / "torchaudio" / "__init__.py").write_text(LLAMAFACTORY_STUB)
        env["PYTHONPATH"] = str(stub)
    folder = Path(tempfile.mkdtemp(dir=scratch))
    out = subprocess.run([python, __file__, "--child", kind, str(data_dir), str(workers), str(folder)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{kind} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the best is reported")
    parser.add_argument("--llamafactory", metavar="PYTHON", help="the python of a venv with llamafactory installed")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "DATA_DIR", "WORKERS", "SCRATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, data_dir, workers, scratch = args.child
        print(json.dumps(CHILDREN[kind](Path(data_dir), int(workers), Path(scratch))))
        return

    scratch = Path(tempfile.mkdtemp(prefix="tokenize_speed_"))
    data_dir = make_data(scratch / "data", args.samples)
    print(f"{args.samples} samples ({(data_dir / 'bench.json').stat().st_size / 1e6:.1f} MB of json), tokenizer "
          f"qwen2.5-instruct, template qwen, cutoff_len {CUTOFF_LEN}, best of {args.repeat}")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for label, measure in (("tokenizer alone, rendered text (the ceiling)", tokenizer_alone),
                           ("tunelab sft processor alone (no datasets)", processor_child)):
        alone = min((measure(data_dir, min(args.samples, 10_000)) for _ in range(args.repeat)),
                    key=lambda run: run["seconds"])
        print(f"{label:56} {alone['rows'] / alone['seconds']:7.0f} samples/s ({alone['rows']} samples, 1 process)")
    rows = [("tunelab", sys.executable, 1, "false"), ("tunelab", sys.executable, 2, "false"),
            ("tunelab", sys.executable, 1, "true")]
    if args.llamafactory:
        rows += [("llamafactory", args.llamafactory, 1, "false"), ("llamafactory", args.llamafactory, 2, "false"),
                 ("llamafactory", args.llamafactory, 1, "true")]
    for kind, python, workers, parallelism in rows:
        runs = []
        for _ in range(args.repeat):
            load = os.getloadavg()[0]
            runs.append((run_child(python, kind, data_dir, workers, parallelism, scratch), load))
        best, load = min(runs, key=lambda run: run[0]["seconds"])
        label = f"{kind}, {workers} worker(s), TOKENIZERS_PARALLELISM={parallelism}"
        warm = f", warm cache {best['warm_seconds']:.2f} s" if "warm_seconds" in best else ""
        every = ", ".join(f"{run['seconds']:.1f}" for run, _ in runs)
        print(f"{label:56} {best['rows'] / best['seconds']:7.0f} samples/s ({best['seconds']:.1f} s{warm}; load "
              f"{load:.2f} at its start; all runs {every} s)")
        if "tokens" in best:
            print(f"    {best['tokens']}")


if __name__ == "__main__":
    main()
