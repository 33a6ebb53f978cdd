"""The documentation's links: every relative link and image in README.md and docs/*.md points at a file
of the repository, every #anchor at a heading of its page (GitHub's slug rules), and README.md stays a
front page (at most 200 lines). Plain files, no Ray."""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 200

# [text](target) and ![alt](target), an optional "title" after the target; the text may hold one level of
# brackets ([`a[0]`](x)).
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")  # http:, https:, mailto:, //host
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def doc_files():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading):
    """GitHub's anchor for a heading: links reduced to their text, lower case, everything but letters,
    digits, '_', '-' and spaces dropped, spaces to '-'."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text):
    """Every heading's anchor, with GitHub's -1, -2 … suffixes for repeated headings."""
    seen, found = {}, set()
    for _, line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text):
    """(line number, target) of every link and image outside code."""
    for number, line in prose_lines(text):
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            yield number, m.group(1)


def broken_links(path, root=ROOT):
    """'file:line: target (why)' for every relative link of the markdown file at `path` that does not
    resolve inside `root`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    problems = []
    for number, target in links(text):
        where = f"{os.path.relpath(path, root)}:{number}: {target}"
        if not target:
            problems.append(f"{where} (empty link)")
            continue
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if os.path.commonpath([resolved, root]) != root:
            problems.append(f"{where} (outside the repository)")
            continue
        if not os.path.exists(resolved):
            problems.append(f"{where} (no such file)")
            continue
        if anchor and resolved.endswith(".md"):
            with open(resolved, encoding="utf-8") as f:
                if anchor not in anchors(f.read()):
                    problems.append(f"{where} (no heading with that anchor)")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(path):
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_front_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_links_every_docs_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        targets = {t.partition("#")[0] for _, t in links(f.read())}
    pages = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}
    assert pages and pages <= targets, f"docs pages not linked from README.md: {sorted(pages - targets)}"


def test_the_checker_finds_broken_links(tmp_path):
    """The check above can fail: a missing file, a missing anchor, a path out of the repository and a
    missing image are reported; good links, external ones and links inside code are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Bad input and re-runs\n\n## Repeated\n\n## Repeated\n")
    (tmp_path / "pic.png").write_bytes(b"")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\n## What it does, per volume (one Ray task each)\n\n"
        "[ok](docs/page.md) [ok anchor](docs/page.md#bad-input-and-re-runs) [second](docs/page.md#repeated-1)\n"
        "[own heading](#what-it-does-per-volume-one-ray-task-each) ![pic](pic.png) [web](https://example.com/x)\n"
        "`[in code](missing-in-code.md)`\n\n```\n[in a fence](missing-in-fence.md)\n```\n\n"
        "[gone](docs/gone.md)\n[bad anchor](docs/page.md#no-such-heading)\n"
        "![missing picture](docs/missing.png)\n[escape](../outside.md)\n[own bad](#nope)\n")
    found = broken_links(str(readme), root=str(tmp_path))
    assert [p.split(": ", 1)[1] for p in found] == [
        "docs/gone.md (no such file)",
        "docs/page.md#no-such-heading (no heading with that anchor)",
        "docs/missing.png (no such file)",
        "../outside.md (outside the repository)",
        "#nope (no heading with that anchor)",
    ]


@pytest.mark.parametrize("heading, expected", [
    ("What it does, per volume (one Ray task each)", "what-it-does-per-volume-one-ray-task-each"),
    ("Bad input and re-runs", "bad-input-and-re-runs"),
    ("`segment`: bulk jobs", "segment-bulk-jobs"),
    ("Joining a `ray start` cluster", "joining-a-ray-start-cluster"),
    ("See [the docs](docs/x.md) now", "see-the-docs-now"),
    ("snake_case stays", "snake_case-stays"),
])
def test_slugs_follow_github(heading, expected):
    assert slug(heading) == expected
