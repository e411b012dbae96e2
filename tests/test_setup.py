"""scripts/setup.sh needs no apt; .ci/install_chromium retries a busy apt and never fails CI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASH = shutil.which("bash")


def _bin_dir(tmp: Path, tools: dict[str, str]) -> Path:
    """A folder for PATH holding ``dirname`` and ``id`` from the system and the scripts ``tools``
    (name -> bash body): nothing else, so no apt-get is reachable unless a test puts one there."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name in ("dirname", "id", "sleep"):
        (bin_dir / name).symlink_to(shutil.which(name))
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!{BASH}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _setup_copy(tmp: Path) -> tuple[Path, Path]:
    """scripts/setup.sh in a folder whose existing .venv has a stand-in python: ``-c`` runs the
    real interpreter (torch is installed, so no torch install), ``-m pip`` is only recorded."""
    root = tmp / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    calls = tmp / "python_calls"
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(
        f'#!{BASH}\necho "$*" >> {calls}\n'
        f'if [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
        'if [ "$1 $2" = "-m pip" ]; then exit 0; fi\n'
        "exit 3\n"
    )
    (venv_bin / "python").chmod(0o755)
    return root, calls


def test_setup_succeeds_with_no_apt_get_on_path(tmp_path):
    root, calls = _setup_copy(tmp_path)
    bin_dir = _bin_dir(tmp_path, {})
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    assert shutil.which("apt-get", path=env["PATH"]) is None
    done = subprocess.run(
        [BASH, str(root / "scripts" / "setup.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    # the existing venv kept its torch; the project went in with its test tools, the demo's
    # packages and TensorBoard (extras that the package itself never imports)
    assert calls.read_text().splitlines() == [
        "-c import torch",
        "-m pip install -q -e .[dev,app,tensorboard]",
    ]


def test_setup_never_calls_apt_even_where_apt_is_busy(tmp_path):
    """An apt-get that fails as a held dpkg lock does (exit 100) and records that it ran."""
    root, _ = _setup_copy(tmp_path)
    ran = tmp_path / "apt_ran"
    bin_dir = _bin_dir(tmp_path, {"apt-get": f"touch {ran}; exit 100", "apt": f"touch {ran}; exit 100"})
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    done = subprocess.run(
        [BASH, str(root / "scripts" / "setup.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert not ran.exists()
    code = [
        line for line in (REPO / "scripts" / "setup.sh").read_text().splitlines() if not line.startswith("#")
    ]
    assert not [line for line in code if re.search(r"\bapt(-get)?\b", line)]


def _install_chromium(
    tmp: Path, apt_body: str | None, uid: int = 0
) -> tuple[subprocess.CompletedProcess, Path]:
    tools = {"id": f"echo {uid}"}
    if apt_body is not None:
        tools["apt-get"] = apt_body
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name in ("sleep", "cat", "touch", "chmod"):
        (bin_dir / name).symlink_to(shutil.which(name))
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!{BASH}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    chromium = tmp / "chromium"  # where the browser would be; absent until the fake apt "installs" it
    env = {"PATH": str(bin_dir), "CHROMIUM": str(chromium), "APT_TRIES": "4", "APT_WAIT": "0"}
    done = subprocess.run(
        [BASH, str(REPO / ".ci" / "install_chromium")], env=env, capture_output=True, text=True, timeout=60
    )
    return done, chromium


def test_ci_retries_apt_while_the_dpkg_lock_is_held(tmp_path):
    """apt-get fails twice with exit 100 (lock held), then works: chromium gets installed."""
    count = tmp_path / "count"
    body = (
        f'echo "$*" >> {tmp_path / "apt_calls"}; n=$(($(cat {count} 2>/dev/null || echo 0) + 1)); '
        f"echo $n > {count}; [ $n -le 2 ] && exit 100; "
        f'case "$*" in *install*) touch {tmp_path / "chromium"}; chmod +x {tmp_path / "chromium"};; esac; exit 0'
    )
    done, chromium = _install_chromium(tmp_path, body)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "apt_calls").read_text().splitlines()
    assert [c.split()[-1] for c in calls] == ["update", "update", "update", "chromium"]
    assert all("DPkg::Lock::Timeout=0" in c for c in calls)
    assert done.stderr.count("another apt may hold the lock") == 2 and "installed chromium" in done.stderr
    assert os.access(chromium, os.X_OK)


def test_ci_goes_on_when_apt_keeps_failing_or_is_missing(tmp_path):
    (tmp_path / "busy").mkdir()
    done, _ = _install_chromium(tmp_path / "busy", "exit 100")
    assert done.returncode == 0
    assert done.stderr.count("apt-get update failed") == 4  # APT_TRIES
    assert "apt could not install chromium: the browser test will skip" in done.stderr
    (tmp_path / "none").mkdir()
    done, _ = _install_chromium(tmp_path / "none", None)
    assert done.returncode == 0 and "no apt-get as root to install it" in done.stderr
    (tmp_path / "user").mkdir()
    done, _ = _install_chromium(tmp_path / "user", "exit 0", uid=1000)
    assert done.returncode == 0 and "no apt-get as root to install it" in done.stderr
