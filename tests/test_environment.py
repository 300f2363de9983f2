"""pyproject.toml and environment.yml must declare the same dependencies with the same constraints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]

# pyproject (PyPI) name -> conda-forge name, where they differ.
CONDA_NAMES = {"torch": "pytorch", "simpleitk": "simpleitk", "opentsne": "opentsne", "kaleido": "python-kaleido"}
# dask[distributed] on PyPI is dask + distributed on conda-forge.
EXTRA_SPLITS = {("dask", "distributed"): ["dask", "distributed"]}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_requirements() -> dict[str, str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        reqs.extend(extra)
    out: dict[str, str] = {}
    for line in reqs:
        req = Requirement(line)
        name = _canonical(req.name)
        spec = str(req.specifier)
        for extra in sorted(req.extras):
            if (name, extra) in EXTRA_SPLITS:
                for part in EXTRA_SPLITS[(name, extra)]:
                    out[f"conda:{part}"] = spec
                break
        else:
            out[f"conda:{CONDA_NAMES.get(name, name)}"] = spec
            out[f"pip:{name}"] = spec
    return out


def _environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for line in dep["pip"]:
                if line.startswith("-e"):
                    continue
                req = Requirement(line)
                out[f"pip:{_canonical(req.name)}"] = str(req.specifier)
        elif not dep.startswith(("python", "pip")) or dep.startswith("python-"):
            req = Requirement(dep)
            out[f"conda:{_canonical(req.name)}"] = str(req.specifier)
    return out


def test_environment_yml_mirrors_pyproject() -> None:
    py = _pyproject_requirements()
    env = _environment_requirements()
    for key, spec in env.items():
        assert key in py, f"environment.yml declares {key} which pyproject.toml does not"
        assert py[key] == spec, f"{key}: environment.yml says {spec!r}, pyproject.toml says {py[key]!r}"
    conda_or_pip = {k.split(":", 1)[1] for k in env}
    for key in py:
        kind, name = key.split(":", 1)
        if kind == "conda":
            pip_name = next((p for p, c in CONDA_NAMES.items() if c == name), name)
            assert name in conda_or_pip or pip_name in conda_or_pip, (
                f"pyproject.toml requires {name} but environment.yml does not declare it"
            )


def test_torch_is_capped_at_the_cpu_wheel() -> None:
    """An open torch range pulls a multi-GB CUDA build on our machines (README, stack notes)."""
    spec = _pyproject_requirements()["pip:torch"]
    assert "<=2.13.0" in spec
