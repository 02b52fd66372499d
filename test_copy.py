"""The copy rule, checked over the whole module: every public definition of wbflow.py, pasted under
the module's import block together with the definitions its docstring's `Copy with:` line names,
refers to nothing else of wbflow. Each section's test file also runs its functions pasted alone."""
import ast
import re
from pathlib import Path

import pytest

from conftest import paste_alone

SOURCE = (Path(__file__).resolve().parent / "wbflow.py").read_text()
TREE = ast.parse(SOURCE)
DEFINITIONS = {node.name: node for node in TREE.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
MODULE_NAMES = set(DEFINITIONS) | {target.id for node in TREE.body if isinstance(node, ast.Assign)
                                   for target in node.targets if isinstance(target, ast.Name)}
PUBLIC = sorted(name for name in DEFINITIONS if not name.startswith("_"))


def copy_with(name):
    """The names on the `Copy with:` line of `name`'s docstring (empty when it has none)."""
    doc = ast.get_docstring(DEFINITIONS[name]) or ""
    return set(re.findall(r"\w+", doc.split("Copy with:", 1)[1])) if "Copy with:" in doc else set()


def module_names_used(name):
    return {node.id for node in ast.walk(DEFINITIONS[name]) if isinstance(node, ast.Name)} & MODULE_NAMES - {name}


def test_the_module_has_the_public_functions_the_brief_names():
    assert {"train_epoch", "validate", "euler_sample", "fid", "log_artifact", "save_best", "frechet_distance",
            "wandb_run", "save_checkpoint", "load_checkpoint", "inception_score", "FlowUNet"} <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_a_public_definition_needs_only_what_its_copy_with_line_names(name):
    pasted = {name} | copy_with(name)
    assert pasted <= set(DEFINITIONS) | MODULE_NAMES, f"Copy with: names what wbflow does not define"
    missing = set().union(*(module_names_used(each) for each in pasted)) - pasted
    assert not missing, f"{name} pasted with {sorted(pasted - {name})} still needs {sorted(missing)}"


@pytest.mark.parametrize("name", PUBLIC)
def test_a_public_definition_pastes_under_the_import_block(name):
    namespace = paste_alone(name, *sorted(copy_with(name) & set(DEFINITIONS)))
    assert callable(namespace[name])
