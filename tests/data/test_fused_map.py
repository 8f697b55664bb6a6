"""Converting and tokenizing in one map (data/fused_map.py) gives the rows, skips and token counts of the two maps.

A dataset whose entry names an `images` column goes the general way (convert, measure the media, check, tokenize);
the same file without that column goes through the fused map. Each file holds invalid samples, the first batch
only invalid ones.
"""

import json
from dataclasses import asdict

import pytest

from tunelab.config import load_config
from tunelab.data import get_template, load_datasets
from tunelab.data.fused_map import fusable
from tunelab.data.registry import resolve_datasets
from helpers import REPO
from transformers import AutoTokenizer

ALPACA = {"prompt": "instruction", "query": "input", "response": "output"}
PAIRS = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}


def _dataset_dir(tmp_path):
    alpaca = json.loads((REPO / "data" / "alpaca_demo.json").read_text())[:12]
    invalid = [{"instruction": "", "input": "", "output": "no prompt"}, {"instruction": "no reply", "output": ""},
               {"instruction": "a number", "output": 42}]
    pairs = json.loads((REPO / "data" / "dpo_demo.json").read_text())[:8]
    broken_pair = {**pairs[0], "rejected": {"from": "gpt", "value": ""}}
    files = {"alpaca.json": invalid + alpaca[:6] + invalid[1:2] + alpaca[6:],
             "pairs.json": [broken_pair, broken_pair, broken_pair] + pairs + [broken_pair]}
    for name, rows in files.items():
        (tmp_path / name).write_text(json.dumps([{**row, "images": []} for row in rows]))
    info = {"alpaca": {"file_name": "alpaca.json", "columns": ALPACA},
            "alpaca_images": {"file_name": "alpaca.json", "columns": {**ALPACA, "images": "images"}},
            "pairs": {"file_name": "pairs.json", "ranking": True, "formatting": "sharegpt", "columns": PAIRS},
            "pairs_images": {"file_name": "pairs.json", "ranking": True, "formatting": "sharegpt",
                             "columns": {**PAIRS, "images": "images"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


@pytest.mark.parametrize(("stage", "dataset", "kind"), [("sft", "alpaca", None), ("dpo", "pairs", None),
                                                        ("sft", "alpaca", "prompt")])
def test_the_fused_map_gives_what_the_two_maps_give(tiny_model_dir, tmp_path, stage, dataset, kind):
    folder = _dataset_dir(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded = {}
    for name in (dataset, f"{dataset}_images"):
        config = load_config({"model_name_or_path": str(tiny_model_dir), "stage": stage, "template": "chatml",
                              "dataset": name, "dataset_dir": str(folder), "cutoff_len": 64,
                              "preprocessing_batch_size": 3, "cache_dir": str(tmp_path / name)})
        template = get_template(config, tokenizer)
        template.prepare_tokenizer(tokenizer)
        spec = resolve_datasets([name], str(folder), stage)[0]
        assert fusable(spec, kind or ("pairwise" if stage == "dpo" else "sft"), None) == (name == dataset)
        splits = load_datasets(config, tokenizer, template, kind=kind)
        report = asdict(splits.reports[0])
        report["validation"].pop("name")
        loaded[name] = splits.train.to_dict(), report
    fused, general = loaded[dataset], loaded[f"{dataset}_images"]
    assert fused[0] == general[0]
    assert fused[1] == general[1]
    assert fused[1]["validation"]["skipped"], "the invalid samples were counted"
    assert len(next(iter(fused[0].values()))) == fused[1]["validation"]["total"] - sum(
        rule["count"] for rule in fused[1]["validation"]["skipped"].values())
