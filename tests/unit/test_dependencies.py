"""Every third-party module the package imports is installed by `pip install .` (setup.py's
install_requires), so no command fails with a missing module after the README's install: the
test and dev tools (transformers, datasets, pytest) stay out of the package's own code."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_INSTALLED = {"tests", "benchmarks"}  # setup.py's find_packages excludes them


def install_requires() -> set[str]:
    """The distribution names of setup.py's install_requires, normalised."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return {normalised(re.split(r"[<>=;\[ ]", ast.literal_eval(req))[0]) for req in node.value.elts}
    raise AssertionError("setup.py has no install_requires")


def normalised(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def imported_modules() -> dict[str, set[str]]:
    """Top-level third-party module -> the package files that import it."""
    found: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in NOT_INSTALLED or relative.name == "setup.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("sparsetron", "__future__"):
                    found.setdefault(top, set()).add(str(relative))
    return found


def test_every_imported_package_is_an_install_requirement():
    required = install_requires()
    providers = importlib.metadata.packages_distributions()
    missing = {
        module: sorted(files)
        for module, files in imported_modules().items()
        if not {normalised(d) for d in providers.get(module, [module])} & required
    }
    assert not missing, f"imported but not in setup.py's install_requires: {missing}"
    assert "safetensors" in required  # `convert` reads and writes model.safetensors
