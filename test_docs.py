"""The README and docs/: a README of at most 250 lines that starts with both smoke commands and keeps CI's
test command, links that resolve (files and headings), a reference page naming every public wbflow
definition, and no issue numbers anywhere."""
import ast
import re
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
PAGES = sorted((HERE / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)


def prose(page):
    """The page's lines outside ``` code blocks."""
    lines, in_code = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def heading_ids(page):
    """The ids GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in prose(page) if line.startswith("#")}


def local_links(page):
    """(target file, heading id or None) of every link that stays in the repository."""
    targets = [target for line in prose(page) for target in LINK.findall(line) if "://" not in target]
    return [((page.parent / path).resolve() if path else page, anchor or None)
            for path, _, anchor in (target.partition("#") for target in targets)]


def test_readme_is_at_most_250_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_readme_first_screen_gives_both_smoke_commands_and_ci_runs_its_test_command():
    first_screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:30])
    assert "python train_flow.py --smoke" in first_screen and "python train_fire.py --smoke" in first_screen
    command = "python -m pytest -q -n auto"
    assert f"\n{command} " in README.read_text(encoding="utf-8")
    assert (HERE / ".ci" / "run").read_text().rstrip().endswith(command)


def test_readme_links_every_docs_page():
    linked = {path for path, _ in local_links(README)}
    assert PAGES and not [page.name for page in PAGES if page.resolve() not in linked]


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda page: page.name)
def test_every_link_resolves_to_a_file_and_its_heading(page):
    broken = [(str(path.relative_to(HERE)), anchor) for path, anchor in local_links(page)
              if not path.exists() or (anchor and path.suffix == ".md" and anchor not in heading_ids(path))]
    assert not broken


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda page: page.name)
def test_readme_and_docs_name_no_issue_numbers(page):
    assert not re.findall(r"\bissues?\s+#?\d+", page.read_text(encoding="utf-8"), flags=re.IGNORECASE)


def test_the_function_reference_names_every_public_wbflow_definition():
    tree = ast.parse((HERE / "wbflow.py").read_text(encoding="utf-8"))
    public = [node.name for node in tree.body
              if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")]
    reference = (HERE / "docs" / "functions.md").read_text(encoding="utf-8")
    assert len(public) > 50 and not [name for name in public if f"`{name}`" not in reference]
