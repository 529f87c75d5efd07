"""The README stays a short front page and every relative link in it and in docs/ resolves.

A newcomer reads README.md first: it must stay under 10 KB and open with the two fresh-machine
commands (`make demo`, `make test`, both real Makefile targets); the rest lives in docs/*.md, so a
link to a moved or renamed page (or a heading that no longer exists) is a broken promise.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_readme_is_short_and_starts_with_the_two_commands():
    readme = ROOT / "README.md"
    assert readme.stat().st_size < 10 * 1024, f"README.md is {readme.stat().st_size} bytes"
    lines = readme.read_text(encoding="utf-8").splitlines()
    first_block = lines.index("```bash")
    assert first_block <= 3, "the README must open with the commands"
    assert lines[first_block + 1].startswith("make demo ")
    assert lines[first_block + 2].startswith("make test ")
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "test-fast"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no '{target}' target"


def test_every_relative_link_resolves():
    broken = []
    for doc in doc_files():
        for link in relative_links(doc):
            target, _, anchor = link.partition("#")
            dest = (doc.parent / target).resolve() if target else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page: `x`, y\n\nSee [there](missing.md) and [here](#a-page-x-y), "
                    "[web](https://example.com).\n```\n[not a link](nowhere.md)\n```\n")
    assert relative_links(page) == ["missing.md", "#a-page-x-y"]
    assert anchors(page) == {"a-page-x-y"}
