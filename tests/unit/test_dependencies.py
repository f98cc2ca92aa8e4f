"""Every third-party module the package imports is installed by `pip install .` (setup.py's
install_requires), so no command fails with a missing module after the README's install: the
test and dev tools (transformers, datasets, pytest) stay out of the package's own code. The one
exception is an optional feature's package, named by an extra of its own (`wandb`), which the
feature asks for by name when it is missing (tests/unit/test_run_observability.py)."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_INSTALLED = {"tests", "benchmarks", "experiments"}  # setup.py's find_packages excludes them


def setup_keyword(name: str):
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name}")


def distributions(requirements: list[str]) -> set[str]:
    return {normalised(re.split(r"[<>=;\[ ]", req)[0]) for req in requirements}


def install_requires() -> set[str]:
    """The distribution names of setup.py's install_requires, normalised."""
    return distributions(setup_keyword("install_requires"))


def optional_features() -> set[str]:
    """The distributions of setup.py's extras other than `dev`: each an optional feature's own."""
    return distributions(
        [req for extra, reqs in setup_keyword("extras_require").items() if extra != "dev" for req in reqs]
    )


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
    required = install_requires() | optional_features()
    providers = importlib.metadata.packages_distributions()
    missing = {
        module: sorted(files)
        for module, files in imported_modules().items()
        if not {normalised(d) for d in providers.get(module, [module])} & required
    }
    assert not missing, f"imported but not in setup.py's install_requires: {missing}"
    assert "safetensors" in install_requires()  # `convert` reads and writes model.safetensors
    assert optional_features() == {"wandb"}
