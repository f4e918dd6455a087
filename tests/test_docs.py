"""The README and the docs pages: every relative link resolves, the README stays one screen long.

The README is what a newcomer reads first: at most 260 lines, with install, train, sample and test
in one bash block within its first 40 lines. Links are checked the way GitHub renders them: a path
relative to the page, and a ``#fragment`` that must name a heading of the target page (GitHub's
anchor rule: lower case, punctuation dropped, spaces to hyphens, a ``-N`` suffix for repeats).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

README_MAX_LINES = 260
QUICK_START_WITHIN = 40

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"`[^`]*`")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code removed."""
    out, in_fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append((number, _INLINE_CODE.sub("", line)))
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link and image outside code."""
    return [(n, m.group(1)) for n, line in _prose_lines(text) for m in _LINK.finditer(line)]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading (before the -N suffix of repeats)."""
    text = heading.replace("`", "").replace("*", "")
    kept = [c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LMN"]
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading id of a page, repeats numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines_keep_code(text):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = github_anchor(m.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def _prose_lines_keep_code(text: str) -> list[tuple[int, str]]:
    """Like _prose_lines, but inline code stays (a heading's `code` is part of its id)."""
    out, in_fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append((number, line))
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link of ``page`` whose file or heading does not exist."""
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(root)}:{number}: {target}"
        shown = dest.relative_to(root) if dest.is_relative_to(root) else dest
        if not dest.exists():
            problems.append(f"{where}: no such file {shown}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{where}: no heading #{fragment} in {shown}")
    return problems


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every ```bash block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if current is None and line.strip() == "```bash":
            current, start = [], number
        elif current is not None and line.strip() == "```":
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _option(command: str, flag: str) -> str:
    words = shlex.split(command)
    return words[words.index(flag) + 1]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert page.exists()
    assert broken_links(page) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    # A test of the test: a page with two good and two broken links, and two in code that are not links.
    (tmp_path / "other.md").write_text("# Other page\n\n## The `tuned` answer: 4x longer\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#the-tuned-answer-4x-longer) [self](#page)\n"
        "[gone](missing.md) [no heading](other.md#nothing-here)\n"
        "```\n[in code](not-checked.md)\n```\n`[inline](not-checked-either.md)`\n",
        encoding="utf-8",
    )
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2, problems
    assert "page.md:4: missing.md: no such file" in problems[0]
    assert "no heading #nothing-here in other.md" in problems[1]


def test_github_anchors_follow_githubs_rule():
    assert github_anchor("Measured: nanoGPT's CPU recipe") == "measured-nanogpts-cpu-recipe"
    assert github_anchor("Side by side with Flax and jax.nn") == "side-by-side-with-flax-and-jaxnn"
    assert (
        github_anchor("3. The tuned answer: each arm at its own learning rate, 4x longer (`:tuned_cpu`)")
        == "3-the-tuned-answer-each-arm-at-its-own-learning-rate-4x-longer-tuned_cpu"
    )
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_readme_is_one_screen_long():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_readme_quick_start_installs_trains_samples_and_tests_within_its_first_lines():
    start, lines = bash_blocks(README.read_text(encoding="utf-8"))[0]
    assert start + len(lines) + 1 <= QUICK_START_WITHIN, f"the quick start ends past line {QUICK_START_WITHIN}"
    commands = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    # CI (.ci/run) runs exactly these two lines: keep them verbatim.
    assert commands[0] == 'pip install -e ".[dev]"'
    assert commands[-1] == "pytest"
    train = [c for c in commands if c.startswith("python -m experiments.train ")]
    sample = [c for c in commands if c.startswith("python -m experiments.sample ")]
    assert len(train) == len(sample) == 1
    assert commands.index(train[0]) < commands.index(sample[0])
    # The sample reads the run the train command wrote.
    assert _option(sample[0], "--workdir") == _option(train[0], "--workdir")
    # The config and its variant exist in this clone.
    path, _, variant = _option(train[0], "--config").partition(":")
    spec = importlib.util.spec_from_file_location("_quick_start_config", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    assert config.max_iters <= 100, "the quick start should train a short run"


def test_no_figure_that_changes_with_every_commit():
    # Test counts and the suite's minutes go stale with every commit; CI prints the slowest tests itself.
    pattern = re.compile(r"\b\d[\d,]*\s+(tests|passed|skipped)\b|\bsuite\b[^.]*\b\d+\s*min", re.I)
    found = [
        f"{page.relative_to(ROOT)}:{n}: {line.strip()}"
        for page in PAGES
        for n, line in _prose_lines(page.read_text(encoding="utf-8"))
        if pattern.search(line)
    ]
    assert found == []


@pytest.mark.slow
def test_the_readme_library_snippet_runs():
    text = README.read_text(encoding="utf-8")
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(snippet.splitlines()) <= 12
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    logits, tokens, y = namespace["logits"], namespace["tokens"], namespace["y"]
    assert logits.shape == (1, 10, 65)
    assert tokens.shape == (1, 21) and int(tokens.min()) >= 0 and int(tokens.max()) < 65
    assert y.shape == (2, 10, 128)
