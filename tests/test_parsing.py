"""Answer parsing on a corpus of real and realistic completions (tests/data/completions.yaml)."""
from pathlib import Path

import pytest
import yaml

from tomdistill.scenarios import UNPARSED, parse_action, parse_motivation

CORPUS = yaml.safe_load((Path(__file__).parent / "data" / "completions.yaml").read_text())


def test_corpus_is_large_and_mixed():
    assert len(CORPUS) >= 40
    sources = {entry["source"] for entry in CORPUS}
    assert sources == {"smollm2", "written"}
    assert sum(entry["source"] == "smollm2" for entry in CORPUS) >= 20
    assert sum(entry["action"] == UNPARSED for entry in CORPUS) >= 10  # garbage must stay unparsed


@pytest.mark.parametrize("entry", CORPUS, ids=[f"{i}-{e['source']}" for i, e in enumerate(CORPUS)])
def test_corpus_entry(entry, catalogue):
    game = catalogue.games[entry["game"]]
    assert parse_action(entry["completion"], game) == str(entry["action"])
    if "motivation" in entry:
        assert parse_motivation(entry["completion"]) == entry["motivation"]


def test_amounts_are_never_clipped_or_guessed(catalogue):
    game = catalogue.games["public_goods"]
    assert parse_action("Answer: 11", game) == UNPARSED
    assert parse_action("Answer: 2.5", game) == UNPARSED
    assert parse_action("Answer: 0", game) == "0"


def test_non_text_is_unparsed(catalogue):
    assert parse_action(None, catalogue.games["stag_hunt"]) == UNPARSED
