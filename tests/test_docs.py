"""The documentation, code and tools speak to ferkit's users and maintainers: no words that only make
sense inside the project's own development process (its numbered work periods, borrowed machines and
their controls)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKED = ["README.md", "docs", "src", "tools", "benchmarks"]
PROCESS_WORDS = [
    r"\bsessions\b",
    r"\bsession\s+\d",
    r"\b(?:next|this|previous|earlier|later|each|every|per|that|development|working) session\b",
    r"\bend of (?:a|the) session\b",
    r"\blent\b",
    r"\blending\b",
    r"\bgive_back\b",
    r"\bbudget_left",
    r"\bfiles_(?:at|fetch)\b",
    r"\bdevice time\b",
    r"\bsession's\b",
    r"(?-i:\$OUT\b)",
]
PATTERN = re.compile("|".join(PROCESS_WORDS), re.IGNORECASE)


def _text_files():
    for name in CHECKED:
        path = REPO / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if file.suffix in {".md", ".py", ".sh", ".txt", ".toml", ".html", ".js", ".css"} and "egg-info" not in str(file):
                yield file


def test_the_checks_see_the_documentation_and_the_code():
    names = {str(p.relative_to(REPO)) for p in _text_files()}
    assert {"README.md", "docs/model-card.md", "docs/gpu-training.md", "src/ferkit/train.py", "tools/gpu/train.sh"} <= names


@pytest.mark.parametrize("phrase", ["resumed in the next session", "stopped by the session's end", "session 6",
                                    "for sessions lent one", "call give_back", "budget_left_s", "the reply's files_at",
                                    "as at the end of a session", "into $OUT as NAME"])
def test_process_words_are_recognised(phrase):
    assert PATTERN.search(phrase)


@pytest.mark.parametrize("phrase", ["onnxruntime.InferenceSession(path)", "self.session.run(None, feeds)",
                                    "an ONNX Runtime session and its metadata", "blended with another face",
                                    'mkdir -p "$out"'])
def test_ordinary_words_are_not(phrase):
    assert not PATTERN.search(phrase)


def test_no_file_uses_words_of_the_development_process():
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in _text_files()
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if PATTERN.search(line)]
    assert not found, "\n".join(found)


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
