"""Installing pytunnel as the README says: the distribution's name, and the man page and
completions at the paths the README gives, for a normal and for an editable install.

Each test builds a fresh venv from a copy of this checkout and installs it with pip
(``--no-deps``: the dependencies come from the test venv through a ``.pth`` file, so only
the build backend is fetched, from the configured package index)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import tunnel

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DIST = "pytunnel-ssh"
# The README's own commands for a venv, run from the directory that holds .venv.
SOURCE_BASH = "source .venv/share/bash-completion/completions/pytunnel.bash"
MAN_PAGE = "man -l .venv/share/man/man1/pytunnel.1"
# What a normal install puts under the venv, and where each comes from in the checkout.
DATA_FILES = {
    "share/man/man1/pytunnel.1": "man/pytunnel.1",
    "share/bash-completion/completions/pytunnel.bash": "completions/pytunnel.bash",
    "share/zsh/site-functions/_pytunnel": "completions/_pytunnel",
    "share/fish/vendor_completions.d/pytunnel.fish": "completions/pytunnel.fish",
}
INSTALL_TIMEOUT = 300


def _copy_checkout(dest: Path) -> Path:
    """The files a build reads, and .ci/setup; building in a copy keeps build/ and
    *.egg-info out of the checkout under test."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("tunnel", "man", "completions"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".ci").mkdir()
    shutil.copy2(ROOT / ".ci" / "setup", dest / ".ci" / "setup")
    return dest


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{args}: {result.returncode}\n{result.stdout}{result.stderr}"
    return result.stdout


def _site_packages(venv: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    return Path(_run([str(venv / "bin" / "python"), "-c", code], venv).strip())


def _install(checkout: Path, *, editable: bool) -> Path:
    """A new .venv inside ``checkout`` with the checkout installed in it."""
    venv = checkout / ".venv"
    _run([sys.executable, "-m", "venv", str(venv)], checkout)
    # The runtime dependencies, from the venv running the tests, after the venv's own
    # (a path in a .pth file: its own .pth files, our editable install's, are not read).
    (_site_packages(venv) / "zz_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_TARGET")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    _run([*pip, *(["-e", "."] if editable else ["."])], checkout, env)
    return venv


def _check_readme_commands(checkout: Path) -> None:
    readme = README.read_text()
    assert SOURCE_BASH in readme
    assert MAN_PAGE in readme
    completion = _run(["bash", "-c", f"{SOURCE_BASH} && complete -p pytunnel"], checkout)
    assert "pytunnel" in completion
    if shutil.which("man") is not None:
        env = {**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"}
        page = _run(["bash", "-c", MAN_PAGE], checkout, env)
        assert "EXIT STATUS" in page


def _check_distribution(venv: Path, checkout: Path) -> None:
    """The distribution's name and version as installed, and the command it provides."""
    site = _site_packages(venv)
    installed = importlib.metadata.distributions(path=[str(site)])
    ours = [(d.metadata["Name"], d.version) for d in installed]
    ours = [item for item in ours if item[0] not in {"pip", "setuptools"}]
    assert ours == [(DIST, tunnel.__version__)]
    version = _run([str(venv / "bin" / "pytunnel"), "-V"], checkout)
    assert version.strip() == f"pytunnel, version {tunnel.__version__}"


@pytest.mark.slow
def test_normal_install(tmp_path: Path) -> None:
    checkout = _copy_checkout(tmp_path / "checkout")
    venv = _install(checkout, editable=False)
    _check_distribution(venv, checkout)
    for installed, source in DATA_FILES.items():
        assert (venv / installed).read_bytes() == (ROOT / source).read_bytes(), installed
    _check_readme_commands(checkout)


@pytest.mark.slow
def test_editable_install_then_link_data(tmp_path: Path) -> None:
    """pip installs no data files for an editable install; ``.ci/setup --link-data`` (which
    ``.ci/setup`` runs after its own editable install) puts links where pip would."""
    checkout = _copy_checkout(tmp_path / "checkout")
    venv = _install(checkout, editable=True)
    _check_distribution(venv, checkout)
    _run(["bash", ".ci/setup", "--link-data", ".venv"], checkout)
    for installed, source in DATA_FILES.items():
        assert (venv / installed).resolve() == (checkout / source).resolve(), installed
    _check_readme_commands(checkout)
    # Run again (as .ci/setup is): the links are replaced, not an error.
    _run(["bash", ".ci/setup", "--link-data", ".venv"], checkout)


def test_link_data_wants_a_venv(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "setup"), "--link-data"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "usage: bash .ci/setup --link-data VENV"


def test_this_checkout_is_installed_under_the_new_name() -> None:
    """``pytunnel`` on PyPI is someone else's project: ours must never be installed, or
    asked for, under that name."""
    # Each distribution once: an editable install may name its package twice.
    assert set(importlib.metadata.packages_distributions()["tunnel"]) == {DIST}
    assert importlib.metadata.version(DIST) == tunnel.__version__
    [script] = [
        ep
        for ep in importlib.metadata.distribution(DIST).entry_points
        if ep.group == "console_scripts"
    ]
    assert (script.name, script.value) == ("pytunnel", "tunnel.cli:main")
