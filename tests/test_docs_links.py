"""Every relative link in the project's Markdown points at a file that exists, and every
`#anchor` at a heading of that file (GitHub's slugs): a section moved or renamed breaks none."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    p
    for p in [
        *ROOT.glob("*.md"),
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("deploy/**/*.md"),
        *ROOT.glob("client/*.md"),
    ]
    if p.is_file()
)
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCED = re.compile(r"```.*?```", re.S)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)  # (a link inside code is not a link)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, link text for links, then every
    character but letters, digits, `_`, `-` and spaces dropped, spaces as `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    body = FENCED.sub("", path.read_text())  # (a `# comment` in a code block is no heading)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+)$", body, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(CODE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        name, _, anchor = target.partition("#")
        dest = (doc.parent / name).resolve() if name else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{doc.relative_to(ROOT)}: {broken}"


def test_the_slug_is_githubs() -> None:
    assert slug("Deliberate differences from peers (verl, TRL, OpenRLHF)") == (
        "deliberate-differences-from-peers-verl-trl-openrlhf"
    )
    assert slug("Contract details beyond spec.md") == "contract-details-beyond-specmd"
    assert slug("Devices and compilation") == "devices-and-compilation"
    assert slug("PyTorch: `softgate_loss` in a training loop") == "pytorch-softgate_loss-in-a-training-loop"
    assert slug("Load (tests/test_load.py, bench/load_bench.py)") == "load-teststest_loadpy-benchload_benchpy"
