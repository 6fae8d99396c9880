"""The Makefile's own rules, as `make` runs them (the installing ones are what CI's `make test` runs)."""

import subprocess

from conftest import REPO


def test_a_venv_left_without_pip_is_made_again(tmp_path):
    # `python3 -m venv` fails at ensurepip on a Debian without python3-venv and leaves bin/python behind: every make
    # after then failed with "No module named pip" until the folder was deleted by hand.
    venv = tmp_path / "venv"
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    assert (venv / "bin" / "python").exists() and not (venv / "bin" / "pip").exists()
    result = subprocess.run(["make", f"VENV={venv}", f"{venv}/bin/pip"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert subprocess.run([venv / "bin" / "python", "-m", "pip", "--version"], capture_output=True).returncode == 0
