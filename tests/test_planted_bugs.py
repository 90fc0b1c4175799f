"""scripts/planted_bugs.py stays runnable: every planted edit still finds its code, and its guard tests exist.

Running the plants (minutes) is not part of CI; this only keeps the list from drifting as the code moves.
"""
from pathlib import Path

import pytest

from scripts.planted_bugs import BUGS, ROOT, plant


@pytest.mark.parametrize("bug", BUGS, ids=lambda b: b.name)
def test_each_planted_bug_still_applies_once_and_names_existing_tests(bug, tmp_path):
    source = (ROOT / bug.path).read_text()
    assert source.count(bug.old) == 1, f"{bug.path} changed: update the {bug.name} plant"
    (tmp_path / bug.path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / bug.path).write_text(source)
    plant(tmp_path, bug)
    planted = (tmp_path / bug.path).read_text()
    assert planted != source and bug.new in planted
    assert all((ROOT / t).is_file() for t in bug.tests)


def test_a_plant_whose_code_moved_is_an_error_not_a_pass(tmp_path):
    bug = BUGS[0]
    (tmp_path / bug.path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / bug.path).write_text("nothing to change here\n")
    with pytest.raises(LookupError, match="occurs 0 times"):
        plant(tmp_path, bug)
