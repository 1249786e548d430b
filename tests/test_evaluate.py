"""Metric definitions and label parsing."""

import numpy as np

from bdjax.evaluate import backdoor_metrics, parse_label


def test_asr_over_all_and_over_correct():
    # four non-target (0) examples triggered: clean predictions 0,0,1,0 (3 correct); triggered 1,1,1,0
    m = backdoor_metrics(clean_pred=np.array([0, 0, 1, 0, 1, 1]), labels=np.array([0, 0, 0, 0, 1, 1]),
                         triggered_pred=np.array([1, 1, 1, 0]), triggered_labels=np.array([0, 0, 0, 0]),
                         triggered_clean_pred=np.array([0, 0, 1, 0]), target=1)
    assert m["cacc"] == 5 / 6
    assert m["asr"] == 3 / 4
    assert m["asr_correct"] == 2 / 3


def test_parse_label_takes_the_first_label_word():
    labels = ("negative", "positive")
    assert parse_label("Positive.", labels) == 1
    assert parse_label("It is negative, not positive", labels) == 0
    assert parse_label("The sentiment of this", labels) == -1
    assert parse_label("nonpositive", labels) == -1
