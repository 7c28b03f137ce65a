"""Set-up minds its own business: scripts/system-tools.sh (run by scripts/setup.sh) installs
Prometheus and promtool without stopping anybody else's `prometheus`, without sudo as root, and
runs twice in a row without harm; the LICENSE file is the licence pyproject declares.

    .venv/bin/python -m pytest tests/test_setup.py -q

The install test runs the real apt-get (the package is already there after set-up, so it changes
nothing), as root or with sudo.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = {"prometheus", "promtool", "sudo"}


def path_without(tmp_path: Path, hidden: set[str]) -> str:
    """A PATH with every system command but ``hidden`` (symlinks in one directory): the script
    then takes its install branch, and as root finds no sudo to call."""
    d = tmp_path / "sysbin"
    d.mkdir()
    for src in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]:
        if not os.path.isdir(src) or ".venv" in src:
            continue
        for entry in os.scandir(src):
            if entry.name not in hidden and not (d / entry.name).exists():
                (d / entry.name).symlink_to(entry.path)
    return str(d)


@pytest.mark.slow
def test_system_tools_leave_an_unrelated_prometheus_alone(tmp_path):
    if os.geteuid() != 0 and not shutil.which("sudo"):
        pytest.fail("needs root or sudo: scripts/system-tools.sh installs a Debian package", pytrace=False)
    if not shutil.which("apt-get"):
        pytest.fail("needs apt-get (Debian): scripts/system-tools.sh installs Prometheus with it", pytrace=False)
    # someone's own Prometheus, as pgrep/pkill see it: a process named exactly `prometheus`
    mine = tmp_path / "mine" / "prometheus"
    mine.parent.mkdir()
    shutil.copy(shutil.which("sleep"), mine)
    proc = subprocess.Popen([str(mine), "600"])
    try:
        seen = subprocess.run(["pgrep", "-x", "prometheus"], capture_output=True, text=True).stdout.split()
        assert str(proc.pid) in seen
        env = {**os.environ, "PATH": path_without(tmp_path, HIDDEN if os.geteuid() == 0 else HIDDEN - {"sudo"})}
        for _ in range(2):                                   # twice in a row: the same, no harm
            r = subprocess.run(["bash", str(ROOT / "scripts" / "system-tools.sh")], env=env, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, r.stdout + r.stderr
            assert proc.poll() is None, f"set-up ended an unrelated prometheus (pid {proc.pid}): {r.stdout}{r.stderr}"
    finally:
        proc.kill()
        proc.wait()


def test_only_the_service_the_install_started_is_stopped_by_its_pid(tmp_path):
    """The stop step alone (sourced), with real processes named prometheus: the one the package's
    pid file names and that was not running before is stopped; an unrelated one is not, nor the
    service when it ran before the install."""
    binary = tmp_path / "prometheus"
    shutil.copy(shutil.which("sleep"), binary)
    unrelated, service = (subprocess.Popen([str(binary), "600"]) for _ in range(2))
    pidfile = tmp_path / "prometheus.pid"
    pidfile.write_text(f"{service.pid}\n")

    def stop(before: str) -> None:
        script = (f'source "{ROOT}/scripts/system-tools.sh"; PIDFILE="{pidfile}"; '
                  f'stop_service_started_by_install "{before}"')
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    try:
        stop(str(service.pid))                 # it ran before the install: not set-up's
        assert service.poll() is None and unrelated.poll() is None
        stop("")
        assert service.wait(timeout=10) is not None and unrelated.poll() is None
    finally:
        for p in (unrelated, service):
            p.kill()
            p.wait()


def test_no_script_stops_processes_by_name():
    for f in (ROOT / "scripts").glob("*.sh"):
        text = f.read_text()
        for word in ("pkill", "killall"):
            assert word not in text, f"{f.name} uses {word}: stop only what set-up started, by PID"


def test_license_file_is_the_licence_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    text = (ROOT / "LICENSE").read_text()
    assert declared == "Apache-2.0"
    assert " ".join(text.split()[:6]) == "Apache License Version 2.0, January 2004"
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
