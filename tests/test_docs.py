"""The user's guide holds together: every relative link in README.md and docs/*.md resolves.

A link resolves when its file (or folder) exists and, for a ``#fragment``, when the target Markdown file has a
heading whose GitHub-style anchor is that fragment. Links inside code blocks and code spans are not links.
Offline and fast: plain text processing, no anomalib import.
"""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def documents() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def outside_code_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)[0] * len(opening.group(1))
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
        else:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags render as nothing
    parts = re.split(r"(`+[^`]*`+)", text)  # code spans render literally; outside them _x_ and *x* are emphasis
    text = "".join(
        part.strip("`") if part.startswith("`") else re.sub(r"(?<!\w)_+|_+(?!\w)", "", part.replace("*", ""))
        for part in parts
    )
    text = "".join(c for c in text.lower() if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file: heading slugs (repeats get -1, -2, ... as on GitHub) and <a name/id>."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in outside_code_blocks(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition outside code."""
    found = []
    for number, raw in outside_code_blocks(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub(lambda span: " " * len(span.group(0)), raw)  # a link inside a code span is code
        found += [(number, target) for target in INLINE_LINK.findall(line)]
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            found.append((number, definition.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    """``file:line: target (why)`` for each relative link of ``path`` that does not resolve."""
    problems = []
    for number, target in links(path):
        if not target or EXTERNAL.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}: {target}"
        if not resolved.exists():
            problems.append(f"{where} (no such file or folder: {resolved})")
        elif fragment and resolved.suffix != ".md":
            problems.append(f"{where} (an anchor into a file that is not Markdown)")
        elif fragment and unquote(fragment) not in anchors(resolved):
            problems.append(f"{where} (no heading with anchor #{fragment} in {resolved.name})")
    return problems


@pytest.mark.parametrize("path", documents(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "Broken links:\n" + "\n".join(problems)


def test_docs_pages_exist() -> None:
    assert len(documents()) > 1, "docs/*.md is missing"


def test_readme_stays_a_short_guide() -> None:
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details into docs/ (<= {README_MAX_LINES})"


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Export and INT8", "export-and-int8"),
        ("`INT8_ACQ`: when `INT8_PTQ` misses", "int8_acq-when-int8_ptq-misses"),
        ("Several GPUs (DDP)", "several-gpus-ddp"),
        ("Stage 1 - Anomaly Amplification", "stage-1---anomaly-amplification"),
        ("Non-ASCII paths: `données/`", "non-ascii-paths-données"),
        ("[The edge tool](export.md)", "the-edge-tool"),
        ("*Emphasis* and _more_", "emphasis-and-more"),
        ("The `__init__.py` file", "the-__init__py-file"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_checker_names_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text(
        "# Other page\n\n## A section\n\n## A section\n\n## The `infer` tool\n\n```\n# not a heading\n```\n",
        encoding="utf-8",
    )
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine too](other.md#a-section) [repeat](other.md#a-section-1) [here](#page)\n"
        "[code heading](other.md#the-infer-tool)\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-section) [self](#nowhere) [fenced](other.md#not-a-heading)\n"
        "[external](https://example.com/x.md) `[in code](missing-too.md)`\n\n"
        "```bash\n[in a block](missing-three.md)\n```\n\n"
        "[ref]: also-missing.md\n",
        encoding="utf-8",
    )
    problems = broken_links(page)
    assert [problem.split(": ", 1)[1].split(" (")[0] for problem in problems] == [
        "missing.md",
        "other.md#no-such-section",
        "#nowhere",
        "other.md#not-a-heading",
        "also-missing.md",
    ]
    assert all(str(page) in problem for problem in problems)
