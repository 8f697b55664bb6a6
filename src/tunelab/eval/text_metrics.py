"""How close a generated reply is to its reference: BLEU-4 and ROUGE-1/2/L, in percent, as LLaMA-Factory scores
`do_predict` runs (so the numbers compare with its `predict_results.json`).

    similarity("我喜欢南京", "我喜欢北京")          # {"bleu-4": ..., "rouge-1": 66.6667, "rouge-2": 50.0, ...}
    mean_similarity(predictions, references)       # the per-sample scores averaged

- ROUGE: both texts are segmented into words with jieba (Chinese has no spaces; English words come out whole), the
  segments joined by spaces are scored by rouge-chinese, and its F-score is taken. An empty prediction or reference
  scores 0.
- BLEU-4: nltk's `sentence_bleu` over *characters* (LLaMA-Factory's choice, inherited from ChatGLM's scripts), with
  `SmoothingFunction().method3`; no character in common scores 0.
- Each per-sample score is rounded to 4 decimals before averaging, as LLaMA-Factory does.

jieba, nltk and rouge-chinese are the optional extra `metrics` (pip install 'tunelab[metrics]'), imported on first use.
"""

import logging
from collections.abc import Sequence
from functools import cache
from typing import Any


#: distribution name -> module name of the packages the scores need.
METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


@cache
def _libraries() -> tuple[Any, Any, Any, Any]:
    # Installed with the metrics extra; a config with do_predict is refused at load when they are missing
    # (config/packages.py).
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    # jieba announces building its dictionary on stderr at the first cut.
    jieba.setLogLevel(logging.WARNING)
    return jieba, sentence_bleu, SmoothingFunction().method3, Rouge()


def segment(text: str) -> str:
    """`text` cut into words by jieba, joined by spaces (the whitespace and line breaks it held are kept as pieces of
    their own, so rouge-chinese still sees its sentences)."""
    jieba = _libraries()[0]
    return " ".join(jieba.cut(text))


def similarity(prediction: str, reference: str) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F-scores of one prediction against its reference, in percent."""
    _, sentence_bleu, smoothing, rouge = _libraries()
    hypothesis, target = segment(prediction), segment(reference)
    if hypothesis.strip() and target.strip():
        scores = rouge.get_scores(hypothesis, target)[0]
        result = {name: scores[name]["f"] for name in ("rouge-1", "rouge-2", "rouge-l")}
    else:
        result = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    result["bleu-4"] = sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing)
    return {name: round(float(result[name]) * 100, 4) for name in METRIC_NAMES}


def mean_similarity(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """`similarity` averaged over the pairs (all 0 when there are none)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    totals = dict.fromkeys(METRIC_NAMES, 0.0)
    for prediction, reference in zip(predictions, references):
        for name, value in similarity(prediction, reference).items():
            totals[name] += value
    return {name: total / max(len(predictions), 1) for name, total in totals.items()}
