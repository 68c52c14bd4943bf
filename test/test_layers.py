"""The layering that import-linter cannot check (``make lint`` checks ``training``'s, pyproject.toml): the
container's modules at the repository root import nothing from ``training``, so the image needs none of it."""

import ast

import pytest
from conftest import REPO

CONTAINER_MODULES = ["contracts.py", "declared.py", "reader.py", "process.py", "inference.py"]  # the image's code


@pytest.mark.parametrize("name", CONTAINER_MODULES)
def test_the_container_modules_import_nothing_from_training(name):
    tree = ast.parse((REPO / name).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m == "training" or m.startswith("training.")]


def test_contracts_imports_nothing_of_the_repository():
    tree = ast.parse((REPO / "contracts.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not {m.split(".")[0] for m in imported} & {"process", "reader", "inference", "training"}
