"""The docs never go stale for a newcomer: docs/development.md's module map names every module, and the README
names every verb of `cellseg`, opens with a table of contents and stays short enough to read in one pass."""

from __future__ import annotations

import re

from cellseg.cli import VERBS
from conftest import ROOT

README_MAX_LINES = 300


def test_the_module_map_lists_every_module() -> None:
    development = (ROOT / "docs" / "development.md").read_text()
    section = development[development.index("## Module map") :]
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
    assert not missing, f"docs/development.md's module map does not list: {missing}"
    assert not sorted(listed - modules - {"bench/"}), (
        f"docs/development.md lists modules that do not exist: {sorted(listed - modules)}"
    )


def test_the_readme_names_every_verb_and_has_a_table_of_contents() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [verb for verb in VERBS if f"cellseg {verb}" not in readme]
    assert not missing, f"README never mentions: {['cellseg ' + verb for verb in missing]}"
    lines = readme.splitlines()
    contents = [
        i for i, line in enumerate(lines) if re.match(r"^#{2,3}\s+(table of )?contents\s*$", line, re.I)
    ]
    assert contents, "README has no '## Contents' heading"
    following = [line for line in lines[contents[0] + 1 :] if line.strip()]
    links = []
    for line in following:
        if not re.match(r"^\s*([-*+]|\d+\.)\s+.*\[[^\]]+\]\(#[^)]+\)", line):
            break
        links.append(line)
    assert len(links) >= 3, (
        f"README's table of contents should be a list of links to its sections: {following[:3]}"
    )
    anchors = {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#{2,3}\s+(.+)$", readme, re.M)
    }
    dead = [a for line in links for a in re.findall(r"\]\(#([^)]+)\)", line) if a not in anchors]
    assert not dead, f"README's table of contents links to no heading: {dead}"


def test_the_readme_reads_in_one_pass() -> None:
    n_lines = len((ROOT / "README.md").read_text().splitlines())
    assert n_lines <= README_MAX_LINES, (
        f"README.md has {n_lines} lines (at most {README_MAX_LINES}): move details to docs/ and link them"
    )
