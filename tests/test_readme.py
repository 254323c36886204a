"""README's Layout table, the newcomer's map of the repo, names every module there is and no other, and each module
has its test file (tests/test_<module>.py); every test the docs cite as evidence (docs/RELIABILITY.md's table) exists."""

from __future__ import annotations

import re

from conftest import ROOT


def test_the_layout_table_names_every_module_and_each_has_its_tests():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.find("\n## ", 1)] if "\n## " in layout[1:] else layout
    named = set(re.findall(r"`([a-z_]+\.py)`", layout))
    modules = {p.name for p in ROOT.glob("*.py")}
    assert named == modules, f"in README's Layout but not in the repo: {sorted(named - modules)}; in the repo but " \
                             f"not in the Layout: {sorted(modules - named)}"
    untested = sorted(m for m in modules if not (ROOT / "tests" / f"test_{m}").is_file())
    assert not untested, f"modules without tests/test_<module>.py: {untested}"


def test_every_test_the_docs_cite_exists():
    """docs/RELIABILITY.md gives each failure mode's test as file::name; a test that moved or was renamed left the
    row pointing at nothing (one did, found when the 32nd session moved tests)."""
    cited = set()
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        cited |= set(re.findall(r"\b(test_[a-z0-9_]+)::(test_[a-z0-9_]+)", doc.read_text()))
    assert len(cited) > 50  # (RELIABILITY.md's table)
    missing = sorted(f"{file}::{name}" for file, name in cited
                     if not re.search(rf"^def {name}\(", (ROOT / "tests" / f"{file}.py").read_text()
                                      if (ROOT / "tests" / f"{file}.py").is_file() else "", re.M))
    assert not missing, f"cited in the docs but not in tests/: {missing}"
