"""LongBench v1 metrics on hand-made cases; each expected value is derived by hand in the comment above it."""

from __future__ import annotations

import pytest

from kvbench.tasks import longbench_metrics as lm


def test_normalize_answer_drops_case_punctuation_and_articles():
    # lower -> "the cat, a dog!" -> no punctuation "the cat a dog" -> articles become spaces -> squeezed
    assert lm.normalize_answer("The Cat, a  Dog!") == "cat dog"
    # full-width punctuation and all whitespace go; ASCII punctuation too
    assert lm.normalize_zh_answer("厦门 大学。") == "厦门大学"


def test_qa_f1():
    # prediction tokens after normalization: [cat, sat, on, mat]; gold: [cat, on, mat]
    # overlap 3 -> precision 3/4, recall 3/3 -> F1 = 2 * 0.75 * 1 / 1.75 = 6/7
    assert lm.qa_f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    assert lm.qa_f1("Paris", "paris") == 1.0
    assert lm.qa_f1("London", "Paris") == 0.0
    # the prediction normalizes to nothing ("the" is an article): no overlap -> 0
    assert lm.qa_f1("The", "Paris") == 0.0


def test_qa_f1_zh_uses_jieba_words():
    # jieba: 我爱北京 -> [我, 爱, 北京]; 北京 -> [北京]; overlap 1 -> P = 1/3, R = 1 -> F1 = (2/3)/(4/3) = 1/2
    assert lm._jieba_cut("我爱北京") == ["我", "爱", "北京"]
    assert lm.qa_f1_zh("我爱北京", "北京") == pytest.approx(0.5)
    # 在厦门大学举办 -> [在, 厦门大学, 举办]; 厦门大学。 -> [厦门大学, 。] and "。" normalizes away
    # overlap 1 -> P = 1/3, R = 1/1 -> 1/2
    assert lm.qa_f1_zh("在厦门大学举办", "厦门大学。") == pytest.approx(0.5)


def test_rouge_l_counts_distinct_words_like_the_rouge_package():
    # One sentence each (no "."). Distinct words: reference {the, cat, was, on, mat} = 5,
    # prediction {the, cat, sat, on, mat} = 5. LCS = "the cat on the mat"; the package keeps it as a set
    # {the, cat, on, mat} = 4. R = P = 4/5 -> F = 2 * 0.64 / 1.6 = 0.8 (less the package's 1e-8 guard).
    assert lm.rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(0.8, abs=1e-6)
    # "." splits sentences: prediction [a b], [c d]; reference [a b c d]. Union of the LCSs with the one
    # reference sentence = {a, b} | {c, d} = 4 words; m = n = 4 -> R = P = F = 1.
    assert lm.rouge_l("a b. c d", "a b c d") == pytest.approx(1.0, abs=1e-6)
    # An empty prediction makes the package raise; the official scorer gives 0.
    assert lm.rouge_l("", "a b") == 0.0
    assert lm.rouge_l("...", "a b") == 0.0


def test_rouge_l_zh_scores_jieba_words():
    # "我 爱 北京" vs "北京": m = 1, n = 3, LCS {北京} = 1 -> R = 1, P = 1/3 -> F = (2/3)/(4/3) = 1/2
    assert lm.rouge_l_zh("我爱北京", "北京") == pytest.approx(0.5, abs=1e-6)


def test_classification():
    classes = ["Location", "Number", "Description", "Entity"]
    # one class named, the gold one -> 1/1
    assert lm.classification("Location", "Location", all_classes=classes) == 1.0
    # two classes named, gold among them -> 1/2
    assert lm.classification("Location or Number", "Number", all_classes=classes) == 0.5
    # gold not named -> 0
    assert lm.classification("Entity", "Number", all_classes=classes) == 0.0
    # "State" is a strict substring of the gold "Statement": dropped -> [Statement] -> 1
    assert lm.classification("Statement", "Statement", all_classes=["State", "Statement"]) == 1.0
    # Official loop quirk: found [a, b, ab]; "a" (substring of gold "ab") is removed, which makes the
    # loop skip "b"; "ab" is the gold and stays -> [b, ab] -> 1/2 (a correct filter would give 1).
    assert lm.classification("ab", "ab", all_classes=["a", "b", "ab"]) == 0.5


def test_retrieval_and_count():
    # numbers in the prediction: [12] -> 1 of 1 is the gold 12
    assert lm.retrieval("Paragraph 12", "Paragraph 12") == 1.0
    # [3, 12] -> 1 of 2
    assert lm.retrieval("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    # no number -> 0; "012" is compared as a string, not 12
    assert lm.retrieval("I do not know", "Paragraph 12") == 0.0
    assert lm.retrieval("Paragraph 012", "Paragraph 12") == 0.0
    # Chinese form: gold id from "段落5"; prediction numbers [5] -> 1; [15] -> 0
    assert lm.retrieval_zh("答案是段落5", "段落5") == 1.0
    assert lm.retrieval_zh("段落15", "段落5") == 0.0
    # count: numbers [7, 10], one equals the gold 7 -> 1/2
    assert lm.count("There are 7 unique paragraphs out of 10", "7") == 0.5


def test_code_sim():
    # first line without ` # // is "x = foo(1)": identical -> 100 -> 1.0
    assert lm.code_sim("```python\n# comment\nx = foo(1)\n", "x = foo(1)") == 1.0
    # "abcd" vs "abce": one block "abc" (3), lengths 4 + 4 -> 2*3/8 = 0.75 -> 75 -> 0.75
    assert lm.code_sim("abcd", "abce") == 0.75
    # "abc" vs "abcd": 2*3/7 = 0.857.. -> rounded to 86 (fuzzywuzzy's integer percent) -> 0.86
    assert lm.code_sim("abc", "abcd") == 0.86
    # only comment lines: the compared line is "" -> 0
    assert lm.code_sim("# a\n// b", "x = 1") == 0.0


def test_code_sim_is_fuzzywuzzy_without_levenshtein():
    """The official scorer's fuzz.ratio runs on difflib (fuzzywuzzy without python-Levenshtein), whose greedy
    matching scores below an exact LCS ratio (rapidfuzz) on reordered code."""
    prediction = "from os import path, getcwd, sep, environ"  # 41 characters each
    gold = "from os import environ, getcwd, path, sep"
    # difflib takes the longest block first: "from os import " (15), then ", getcwd, " (10) between the blocks
    # already taken, then "sep" (3) = 28 -> 2*28/82 = 0.683 -> 68. The longest common subsequence has 29
    # characters -> 2*29/82 = 0.707 -> 71: what an exact (Levenshtein, rapidfuzz) ratio gives.
    assert lm.code_sim(prediction, gold) == 0.68
    # A 210-character line with two arguments swapped: difflib's autojunk (on for sequences of 200+) ignores
    # characters that make up more than 1% of the gold line (spaces, "e", "s", ...), so fewer characters
    # match: 90, where the exact ratio (and difflib without autojunk) gives 98.
    long_gold = (
        "        self.assertEqual(response.status_code, 200, msg=f'unexpected status {response.status_code} for "
        "{url}: {response.content[:200]!r}; headers={dict(response.headers)!r}, cookies={dict(response.cookies)!r}')"
    )
    swapped = long_gold.replace("response.status_code, 200", "200, response.status_code")
    assert len(long_gold) == 210 and lm.code_sim(swapped, long_gold) == 0.90
    # 100 * ratio = 12.5 exactly (one common character in 8 + 8): Python's round gives 12 (half to even),
    # as fuzzywuzzy's int(round(...)), not 13
    assert lm.code_sim("abcdefgh", "aijklmno") == 0.12
    # fuzzywuzzy's decorators: equal strings are 100 before the empty-string check, so "" vs "" is 1.0
    assert lm.code_sim("# only a comment", "") == 1.0
    assert lm.fuzz_ratio("", "x") == 0


def test_score_prediction_first_line_and_best_answer():
    # triviaqa is cut to its first line after leading newlines: "Paris" vs "Paris" -> 1
    assert lm.score_prediction("triviaqa", "\nParis\nFrance is a country", ["Paris", "City of Paris"]) == 1.0
    # hotpotqa is not cut: [paris, france] vs [paris] -> P 1/2, R 1 -> 2/3; the 2nd answer scores 0
    assert lm.score_prediction("hotpotqa", "Paris\nFrance", ["Paris", "Lyon"]) == pytest.approx(2 / 3)
    # trec: classification with the sample's class list, after the first-line cut
    classes = ["Location", "Number"]
    assert lm.score_prediction("trec", "Location\nNumber", ["Location"], classes) == 1.0


def test_every_task_has_an_official_metric():
    from kvbench.tasks.longbench import TASKS

    assert set(lm.TASK_METRIC) == set(TASKS)
    assert set(lm.TASK_METRIC.values()) <= set(lm.METRICS)
