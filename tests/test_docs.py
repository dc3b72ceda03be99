"""The repository is self-contained: what it ships points at nothing outside itself.

(a) no shipped file names the external specification or a path of the machine it was written on;
(b) the file references of README.md and docs/*.md resolve inside the repository;
(c) the command line's help texts name no file outside the repository.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not contain what it forbids.
EXTERNAL_SPEC = "ALGORITHM" + ".md"  # case-sensitive: docs/algorithm.md is ours
FORBIDDEN = [EXTERNAL_SPEC, "../" + "shared", "ARCHITECTURE" + ".md", "CONVENTIONS" + ".md"]
# an absolute path of the build machine: not preceded by a path or URL character
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:" + "work" + "|" + "root" + r")/")


def shipped_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (what a checkout or a
    `ray job submit --working-dir .` carries), that exist in the working tree."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode()
    paths = [REPO / name for name in dict.fromkeys(out.split("\0")) if name]
    return [p for p in paths if p.is_file()]


def read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary
    return data.decode("utf-8", errors="replace")


def test_no_reference_outside_the_repository():
    bad = []
    for path in shipped_files():
        text = read_text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            hits = [word for word in FORBIDDEN if word in line]
            hits += MACHINE_PATH.findall(line)
            if hits:
                bad.append(f"{path.relative_to(REPO)}:{number}: {hits} in {line.strip()[:80]!r}")
    assert not bad, ("files point outside the repository (the algorithm page is "
                     "docs/algorithm.md; cite the paper as arXiv 2604.04142):\n" + "\n".join(bad))


LINK = re.compile(r"\]\(([^)\s]+)\)")
BACKTICKED = re.compile(r"`([^`\s]+)`")
PLACEHOLDER = re.compile(r"[<>*{}$]")


def doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def top_level_dirs() -> set[str]:
    return {p.name for p in REPO.iterdir()
            if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".egg-info")}


def resolves(page: Path, target: str, root_relative: bool) -> bool:
    """`target` names an existing file or folder inside the repository, relative to the page
    (and, for backticked names, which the prose writes from the repository root, to the
    root), or one made by copying a shipped `<name>.example`."""
    target = target.split("::", 1)[0]  # `tests/test_x.py::test_name`
    bases = [page.parent, REPO] if root_relative else [page.parent]
    for base in bases:
        candidate = (base / target).resolve()
        if not candidate.is_relative_to(REPO):
            continue
        # a file the user makes from its shipped template (deploy/cluster.env)
        if candidate.exists() or candidate.with_name(candidate.name + ".example").is_file():
            return True
    return False


def test_doc_references_resolve():
    assert (REPO / "docs" / "algorithm.md").is_file()
    tops = top_level_dirs()
    bad = []
    for page in doc_pages():
        text = page.read_text()
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor of the same page
            path = target.split("#", 1)[0]
            if not resolves(page, path, root_relative=False):
                bad.append(f"{page.relative_to(REPO)}: link ({target})")
        for name in BACKTICKED.findall(text):
            if PLACEHOLDER.search(name) or "://" in name:
                continue
            is_md = name.endswith(".md")
            in_repo_tree = "/" in name and name.split("/", 1)[0] in tops
            if (is_md or in_repo_tree) and not resolves(page, name.rstrip("/"), True):
                bad.append(f"{page.relative_to(REPO)}: `{name}`")
    assert not bad, "references to files the repository lacks:\n" + "\n".join(bad)


def cli_help_texts() -> dict[str, str]:
    """`opgrpo --help` and `opgrpo <command> --help`, from the CLI's own parser, plus the
    string defaults of every option (paths a command uses when none is given)."""
    from opgrpo.cli import build_parser

    parser = build_parser()
    texts = {"opgrpo": parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                defaults = [a.default for a in sub._actions if isinstance(a.default, str)]
                texts[f"opgrpo {name}"] = sub.format_help() + "\n" + "\n".join(defaults)
    return texts


ABSOLUTE = re.compile(r"(?:^|[\s(\[='\"`,])(~?/[\w.-]+(?:/[\w.-]*)*)")
RELATIVE = re.compile(r"(?<![\w./-])([\w.-]+(?:/[\w.-]+)+)")


def test_cli_help_names_no_file_outside_the_repository():
    texts = cli_help_texts()
    assert len(texts) > 5, "no subcommands found: did opgrpo.cli.build_parser change?"
    tops = top_level_dirs()
    bad = []
    for command, text in texts.items():
        bad += [f"{command}: {w!r}" for w in FORBIDDEN if w in text]
        bad += [f"{command}: {p!r}" for p in ABSOLUTE.findall(text)]
        bad += [f"{command}: {p!r}" for p in RELATIVE.findall(text)
                if p.startswith("..") or (p.split("/", 1)[0] in tops and not (REPO / p).exists())]
    assert not bad, "help texts name files outside the repository:\n" + "\n".join(bad)


def test_hard_regime_tables_are_the_saved_results():
    """docs/benchmarks.md section 8's tables are `bench/hard_regime.py report --docs` of the
    committed per-run results: a finished run added without rewriting them fails here."""
    sys.path.insert(0, str(REPO / "bench"))
    import hard_regime

    results = hard_regime.finished_results()
    rendered = hard_regime.render_doc(hard_regime.summarise(results), results)
    assert rendered == (REPO / "docs" / "benchmarks.md").read_text(), (
        "docs/benchmarks.md: hard-regime tables out of date; run "
        "python bench/hard_regime.py report --docs")
