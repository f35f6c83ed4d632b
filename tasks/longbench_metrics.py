"""LongBench (v1) metrics, reimplemented to give the same numbers as the official `LongBench/metrics.py`.

Each metric takes one prediction and one gold answer and returns a score in [0, 1]; `score_prediction`
applies the official post-processing (first line for trec/triviaqa/samsum/lsht) and takes the maximum over
the gold answers. Task scores are the mean of those, x100 (done by the task's `aggregate`).

Libraries, as in the official scorer:
- `rouge` (PyPI, pltrdy) for ROUGE-L: its summary-level ROUGE-L splits text into sentences at "." and
  counts *distinct* words (sets), so repeated words count once; we call it the same way and, like the
  official code, score 0 when it raises (empty prediction, or a RecursionError: its LCS back-tracking
  recurses once per step, about prediction + reference words of one sentence, and long unpunctuated text
  such as jieba-segmented Chinese summaries can pass Python's limit of 1000 frames).
- `jieba` for Chinese word segmentation (qa_f1_zh, rouge_zh).
- code_sim: the official code calls `fuzzywuzzy.fuzz.ratio`, and its requirements install fuzzywuzzy without
  python-Levenshtein, so fuzzywuzzy falls back to `difflib.SequenceMatcher` (with its default `autojunk`).
  `fuzz_ratio` reproduces that fallback with the standard library: difflib's matching is greedy (longest
  block first), so it can score below an exact indel/LCS ratio (rapidfuzz, or fuzzywuzzy with Levenshtein),
  e.g. on reordered imports or arguments, and on lines of 200+ characters, where autojunk ignores frequent
  characters.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

# Tasks whose prediction is cut to its first line before scoring (official eval.py).
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

_EN_PUNCT = frozenset(string.punctuation)
# The official Chinese punctuation set (full-width forms, CJK marks) plus ASCII punctuation.
_ZH_PUNCT = _EN_PUNCT | frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower-case, drop punctuation, drop the articles a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower-case, drop Chinese and English punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCT).split())


def _jieba_cut(text: str) -> list[str]:
    import jieba  # imported lazily: it is slow to import and only Chinese tasks need it

    jieba.setLogLevel(60)  # silence "Building prefix dict ..." on first use
    return list(jieba.cut(text, cut_all=False))


def token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """F1 over token multisets (0 when nothing overlaps, which also covers empty inputs)."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, ground_truth: str, **_: object) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh(prediction: str, ground_truth: str, **_: object) -> float:
    def tokens(text: str) -> list[str]:
        normalized = (normalize_zh_answer(token) for token in _jieba_cut(text))
        return [token for token in normalized if token]

    return token_f1(tokens(prediction), tokens(ground_truth))


def rouge_l(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F from the `rouge` package (summary level), 0 when it raises, as the official code does."""
    from rouge import Rouge

    try:
        scores = Rouge(metrics=["rouge-l"], stats=["f"]).get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # the official scorer catches everything here; see the module docstring
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_l_zh(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L over jieba words (joined by spaces so the `rouge` package sees them as words)."""
    return rouge_l(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def classification(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_: object) -> float:
    """1/k when the gold class is among the k class names found in the prediction, else 0.

    Class names that are a strict substring of the gold name are dropped (so "State" does not count
    against "Statement"). The official loop removes from the list it iterates over, which skips the entry
    right after each removal; we reproduce that so scores match. (The official difflib fallback for "no
    match" is unreachable: its guard compares a list with 0, which is always true.)
    """
    found = [name for name in all_classes if name in prediction]
    kept: list[str] = []
    skip_next = False
    for name in found:
        if skip_next:  # the entry the official loop never looks at
            kept.append(name)
            skip_next = False
        elif name in ground_truth and name != ground_truth:
            skip_next = True
        else:
            kept.append(name)
    return 1.0 / len(kept) if ground_truth in kept else 0.0


def _number_share(prediction: str, target: str) -> float:
    """Share of the numbers in the prediction that equal `target` (0 when there are none)."""
    numbers = re.findall(r"\d+", prediction)
    return sum(number == target for number in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, ground_truth: str, **_: object) -> float:
    return _number_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh(prediction: str, ground_truth: str, **_: object) -> float:
    return _number_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count(prediction: str, ground_truth: str, **_: object) -> float:
    return _number_share(prediction, str(ground_truth))


def fuzz_ratio(first: str, second: str) -> int:
    """`fuzzywuzzy.fuzz.ratio` as the official scorer runs it (no python-Levenshtein): its decorators make
    equal strings 100 (two empty ones too) and an empty string against a non-empty one 0; otherwise
    difflib's ratio as a percent, rounded with Python's `round` (half to even, as fuzzywuzzy's `intr`)."""
    if first == second:
        return 100
    if not first or not second:
        return 0
    return round(100 * difflib.SequenceMatcher(None, first, second).ratio())


def code_sim(prediction: str, ground_truth: str, **_: object) -> float:
    """Similarity of the first prediction line that is not a comment or a code fence to the gold line."""
    line = next(
        (
            line
            for line in prediction.lstrip("\n").split("\n")
            if "`" not in line and "#" not in line and "//" not in line
        ),
        "",
    )
    return fuzz_ratio(line, ground_truth) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge": rouge_l,
    "rouge_zh": rouge_l_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}

# Official dataset2metric (eval.py).
TASK_METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_zh",
    "gov_report": "rouge",
    "qmsum": "rouge",
    "multi_news": "rouge",
    "vcsum": "rouge_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge",
    "lsht": "classification",
    "passage_count": "count",
    "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}


def postprocess(task: str, prediction: str) -> str:
    """Official post-processing: the first line (after leading newlines) for the few-shot tasks."""
    if task in FIRST_LINE_TASKS:
        return prediction.lstrip("\n").split("\n")[0]
    return prediction


def score_prediction(
    task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None
) -> float:
    """The official per-sample score in [0, 1]: the best match over the gold answers."""
    metric = METRICS[TASK_METRIC[task]]
    prediction = postprocess(task, prediction)
    return max((metric(prediction, answer, all_classes=all_classes or ()) for answer in answers), default=0.0)
