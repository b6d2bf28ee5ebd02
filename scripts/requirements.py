"""Print, one a line, the requirements pyproject.toml declares for the named extras (and, with
--dependencies, the dependencies first): what the Makefile and scripts/test_triton_versions.sh
install, so pyproject stays their one source. With --unmet, only those this Python does not
satisfy yet (all of them where the `packaging` module is missing: pip then decides).

    python scripts/requirements.py cpu                  # numpy<2.4
    python scripts/requirements.py --dependencies cpu   # torch..., triton..., numpy, numpy<2.4
"""

import sys
import tomllib
from importlib import metadata
from pathlib import Path


def requirements(extras: list[str], dependencies: bool) -> list[str]:
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    found = list(project["dependencies"]) if dependencies else []
    for extra in extras:
        found += project["optional-dependencies"][extra]
    return found


def unmet(found: list[str]) -> list[str]:
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return found
    missing = []
    for line in found:
        requirement = Requirement(line)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


if __name__ == "__main__":
    flags = {a for a in sys.argv[1:] if a.startswith("--")}
    found = requirements([a for a in sys.argv[1:] if a not in flags], "--dependencies" in flags)
    print("\n".join(unmet(found) if "--unmet" in flags else found))
