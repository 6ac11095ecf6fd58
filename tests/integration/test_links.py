"""The documentation's links and file references are true (README.md, bench/README.md, docs/*.md).

- every markdown link ``[text](target)`` that is not http(s) or mailto names a file or folder of the repository,
  relative to the page, and its ``#anchor``, if any, a heading of the target page (GitHub's slugs);
- every path in backticks (an inline code span or a fenced code block) that starts with one of the repository's
  top-level folders and names a concrete file (an extension, no placeholder such as ``<name>``, ``*``, ``{a,b}``,
  ``...`` or ``version_N``) exists;
- every ``docs/<name>.md`` that the package code names exists, and no file points outside the repository into a
  sibling ``shared`` folder.

No network; reads files only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from cli_utils import ROOT

TOP_LEVEL = ("attacks", "networks", "defenses", "datamodules", "evaluation", "callbacks", "advtrain", "configs",
             "docs", "bench", "tests")
PACKAGES = ("attacks", "networks", "defenses", "datamodules", "callbacks", "evaluation", "advtrain", "bench")
SKIPPED_FOLDERS = {"runs", "data", "build", "lightning_logs", "node_modules", "__pycache__"}
OUTSIDE = "../" + "shared"  # written in two parts so that this file does not name it itself

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"`[^`]+`")
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]*$")
PLACEHOLDER = re.compile(r"[<>*{}$|]|\.\.\.|(?:^|[/_.\-])(?:N|K|X+)(?:$|[/_.\-])|X{2,}")


def pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def split_fences(text: str) -> tuple[str, list[tuple[int, str]]]:
    """The text with fenced code blocks blanked (line numbers kept), and the fenced lines with their numbers."""
    prose, code, fenced = [], [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            prose.append("")
        elif fenced:
            code.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, links and code marks dropped, punctuation but ``-`` and ``_``
    removed, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def path_tokens(code: str):
    """The words of a piece of code that may be repository paths, stripped of surrounding punctuation."""
    for word in code.split():
        word = word.strip("'\"()[],;:").rstrip(".")
        if word.startswith("./"):
            word = word[2:]
        if word.split("/", 1)[0] in TOP_LEVEL and "/" in word:
            yield word


def concrete_file(path: str) -> bool:
    return bool(EXTENSION.search(path.rsplit("/", 1)[-1])) and not PLACEHOLDER.search(path)


def problems(page: Path, root: Path = ROOT, within: Path | None = None) -> list[str]:
    """What is wrong with ``page``'s links and backticked paths, one line each (empty when all is true).

    Backticked paths are relative to ``root`` (the repository), links to the page; no link may leave ``within``
    (the repository too, unless given)."""
    text = page.read_text(encoding="utf-8")
    prose, fenced = split_fences(text)
    found = []

    def line_of(position: int) -> int:
        return prose.count("\n", 0, position) + 1

    codes = [(line_of(m.start()), m.group()[1:-1]) for m in CODE_SPAN.finditer(prose)] + fenced
    for number, code in codes:
        for path in path_tokens(code):
            if concrete_file(path) and not (root / path).exists():
                found.append(f"{page.name}:{number}: `{path}` does not exist")

    # links: outside code spans (blanked, positions kept) and fences
    without_code = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), prose)
    for match in LINK.finditer(without_code):
        target, number = match.group(2), line_of(match.start())
        if re.match(r"(https?|mailto):", target):
            continue
        location, _, anchor = unquote(target).partition("#")
        resolved = (page.parent / location).resolve() if location else page.resolve()
        if not resolved.exists():
            found.append(f"{page.name}:{number}: link to {target}: {location} does not exist")
            continue
        if not resolved.is_relative_to((within or root).resolve()):
            found.append(f"{page.name}:{number}: link to {target} leaves the repository")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            found.append(f"{page.name}:{number}: link to {target}: no heading #{anchor} in {resolved.name}")
    return found


def repository_files(suffixes: tuple[str, ...]):
    """The repository's own files with these suffixes: no hidden folders (.git, .venv), runs, data or builds."""
    for folder, folders, files in os.walk(ROOT):
        folders[:] = [name for name in folders if not name.startswith(".") and name not in SKIPPED_FOLDERS
                      and not name.endswith(".egg-info")]
        for name in files:
            if name.endswith(suffixes):
                yield Path(folder) / name


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_every_link_and_backticked_path_of_the_page_is_true(page):
    assert page.is_file()
    found = problems(page)
    assert not found, "\n".join(found)


def test_the_readme_lists_every_docs_page():
    prose, _ = split_fences((ROOT / "README.md").read_text(encoding="utf-8"))
    linked = {(ROOT / unquote(m.group(2)).partition("#")[0]).resolve() for m in LINK.finditer(prose)}
    missing = [page.name for page in [*(ROOT / "docs").glob("*.md"), ROOT / "bench" / "README.md"]
               if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_every_docs_page_the_package_code_names_exists():
    named = {}
    for package in PACKAGES:
        for source in (ROOT / package).rglob("*.py"):
            for name in re.findall(r"docs/([\w\-]+\.md)", source.read_text(encoding="utf-8")):
                named.setdefault(name, []).append(str(source.relative_to(ROOT)))
    missing = {name: files for name, files in named.items() if not (ROOT / "docs" / name).is_file()}
    assert not missing, f"docs pages named in the code that do not exist: {missing}"


def test_no_file_refers_to_a_folder_outside_the_repository():
    found = [str(path.relative_to(ROOT)) for path in repository_files((".md", ".py", ".yaml", ".yml"))
             if OUTSIDE in path.read_text(encoding="utf-8", errors="replace")]
    assert not found, f"files that refer to {OUTSIDE}: {found}"


def test_the_checker_reports_a_broken_link_anchor_and_path(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: `code`, too\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "A [broken link](missing.md) and a [bad anchor](other.md#no-such-heading).\n"
        "A broken path: `attacks/no_such_attack.py`.\n\n"
        "Fine: [other](other.md#a-section-code-too), [this page](#page), [web](https://example.org/x.md),\n"
        "`attacks/registry.py`, `configs/<dataset>/<experiment>.yaml`, `runs/x/version_N/last.ckpt`,\n"
        "`tests/x/version_N.json`, `callbacks/`, `[not a link](nowhere.md)`.\n\n"
        "```bash\nadvtrain fit -c configs/cifar10/no_such_config.yaml  # [in code](nowhere.md)\n```\n")
    found = problems(page, within=tmp_path)
    assert len(found) == 4, "\n".join(found)
    assert any("missing.md does not exist" in line for line in found)
    assert any("no heading #no-such-heading" in line for line in found)
    assert any("`attacks/no_such_attack.py` does not exist" in line for line in found)
    assert any("`configs/cifar10/no_such_config.yaml` does not exist" in line for line in found)
    assert not any("nowhere.md" in line for line in found)
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "up.md").write_text("[out](../other.md)\n")
    assert [line for line in problems(tmp_path / "inner" / "up.md", within=tmp_path / "inner")
            if "leaves the repository" in line]


def test_slugs_are_githubs():
    assert slug("Paper tables: `advtrain sweep`") == "paper-tables-advtrain-sweep"
    assert slug("Long-range correlated noise and the data set's covariance") == (
        "long-range-correlated-noise-and-the-data-sets-covariance")
    assert slug("Defensive tensorization (Bulat et al. 2021)") == "defensive-tensorization-bulat-et-al-2021"
