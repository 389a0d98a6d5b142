"""docs/faults.md shows the list of faults that tests/test_run_faults.py reproduces."""

from faults import render_table

from launching import ROOT


def test_the_table_of_faults_is_current():
    """Regenerate with: python -c 'import sys; sys.path.insert(0, "tests"); import faults;
    print(faults.render_table(), end="")'"""
    document = (ROOT / "docs" / "faults.md").read_text()
    assert render_table() in document, "docs/faults.md is out of date with tests/faults.py"
