"""The figures the README and the model card quote are the reports' (make docs writes them),
and the README stays a short guide."""

from pathlib import Path

from bt_pipeline.studies.doc_figures import DOCUMENTS, END, START, stale

REPO = Path(__file__).resolve().parents[1]


def test_the_documents_quote_their_reports():
    assert stale(REPO) == []


def test_a_figure_edited_by_hand_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "reports").symlink_to(REPO / "reports", target_is_directory=True)
    for name in DOCUMENTS:
        (tmp_path / name).write_text((REPO / name).read_text(encoding="utf-8"), encoding="utf-8")
    assert stale(tmp_path) == []
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index(START):readme.index(END)]
    first = next(token for token in block.split() if token.strip("*").startswith("0."))
    edited = block.replace(first, first.replace("0.", "0.9", 1), 1)
    (tmp_path / "README.md").write_text(readme.replace(block, edited), encoding="utf-8")
    assert stale(tmp_path) == ["README.md"]


def test_the_readme_is_a_short_guide():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 150
