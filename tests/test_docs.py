"""The documentation agrees with what the code and the committed reports say."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_study_table_is_the_committed_reports():
    """The README's study figures are those of docs/study/study.json (the report's own), not typed in."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("study_table", REPO / "tools" / "study_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.markdown_table(json.loads((REPO / "docs" / "study" / "study.json").read_text()))
    assert table in (REPO / "README.md").read_text()
    assert (REPO / "docs" / "study" / "report.html").stat().st_size > 100_000  # the report, images inside
