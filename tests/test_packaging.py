"""environment.yml (conda) and pyproject.toml (pip) must declare the same dependencies."""

import re
import tomllib

import yaml

from conftest import REPO


def normalize(requirement: str) -> str:
    name, rest = re.match(r"^\s*([A-Za-z0-9._-]+)\s*(.*)$", requirement).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + rest.replace(" ", "")


def test_conda_and_pip_declare_the_same_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = project["dependencies"] + extras["dev"] + extras["book"]
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(map(normalize, declared)) == sorted(map(normalize, pip_section))


def test_ci_runs_what_the_readme_says():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands and all(command in readme for command in commands)
