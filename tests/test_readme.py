"""The README's module list names every module, so a newcomer's map of the code never goes stale."""

from __future__ import annotations

import re

from conftest import ROOT


def test_the_development_section_lists_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Development") :]
    listing = section[section.index("```") + 3 :]
    listing = listing[: listing.index("```")]
    listed, folder = set(), ""
    for line in listing.splitlines():
        match = re.match(r"^(\s*)(\S+)", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        if indent == 2 and name.endswith("/"):
            folder = name
        elif indent == 2:
            folder = ""
            listed.add(name)
        elif indent == 4:
            listed.add(folder + name)
    source = ROOT / "src" / "cellseg"
    modules = {
        p.relative_to(source).as_posix()
        for p in source.rglob("*.py")
        if p.name != "__init__.py" or p.parent == source
    }
    modules = {m for m in modules if not m.startswith("bench/")} | {"bench/"}
    missing = sorted(m for m in modules if m not in listed and m != "bench/")
    assert not missing, f"README's Development section does not list: {missing}"
    assert not sorted(listed - modules - {"bench/"}), f"README lists modules that do not exist: {sorted(listed - modules)}"
