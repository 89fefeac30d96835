"""The scorer against hand-computed SQuAD cases."""

import pytest

from lcc_cli.scoring import contains, exact_match, normalize, score, token_f1


def test_normalize_drops_case_punctuation_articles():
    assert normalize("The  Denver Broncos!") == "denver broncos"
    assert normalize("an apple, a pear") == "apple pear"


@pytest.mark.parametrize("pred,golds,em,f1", [
    ("Denver Broncos", ["Denver Broncos"], 1.0, 1.0),
    ("the Denver Broncos.", ["Denver Broncos"], 1.0, 1.0),
    ("Broncos", ["Denver Broncos"], 0.0, 2 * (1.0 * 0.5) / 1.5),          # p=1, r=1/2 -> 2/3
    ("The Broncos won in Denver", ["Denver Broncos"], 0.0, 2 * (0.5 * 1.0) / 1.5),  # 4 tokens, 2 common
    ("Carolina", ["Denver Broncos"], 0.0, 0.0),
    ("Santa Clara", ["Levi's Stadium", "Santa Clara, California"], 0.0, 2 * (1.0 * 2 / 3) / (1 + 2 / 3)),
    ("", ["x"], 0.0, 0.0),
])
def test_em_and_f1(pred, golds, em, f1):
    assert exact_match(pred, golds) == em
    assert token_f1(pred, golds) == pytest.approx(f1)


def test_contains_matches_whole_words_only():
    assert contains("It was built in 1742 by Vose.", ["1742"]) == 1.0
    assert contains("It was built in 17420.", ["1742"]) == 0.0
    assert contains("The team was the Denver Broncos", ["Denver Broncos", "Broncos"]) == 1.0


def test_score_returns_all_three():
    assert score("Denver Broncos", ["Denver Broncos"]) == {"em": 1.0, "f1": 1.0, "contains": 1.0}
