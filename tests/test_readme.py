"""README's Layout table, the newcomer's map of the repo, names every module there is and no other, and each module
has its test file (tests/test_<module>.py)."""

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
