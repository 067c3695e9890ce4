"""The README's test command: .ci/run runs it verbatim, and its first step (Chromium for the
chat page's browser tests) installs only where it can, as root with apt, and is passed over
elsewhere (a learner's laptop without root, or without apt) instead of failing the command."""

import os
import subprocess

import pytest
from conftest import ROOT

INSTALL = "apt-get install -y -qq chromium chromium-driver"


def readme_test_command():
    """The README's test command: the one line of its test block that runs pytest."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (line,) = [entry for entry in readme.splitlines() if "python -m pytest" in entry and INSTALL in entry]
    return line


def test_ci_runs_the_readmes_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == readme_test_command()


@pytest.mark.parametrize(
    "machine, installs",
    [
        (dict(uid=0, apt=True, driver=False), True),  # CI's: root on Debian, no browser yet
        (dict(uid=0, apt=True, driver=True), False),  # the browser already there
        (dict(uid=1000, apt=True, driver=False), False),  # Debian without root
        (dict(uid=0, apt=False, driver=False), False),  # no apt (macOS, other distributions)
    ],
)
def test_the_install_step_runs_only_as_root_with_apt_and_never_stops_the_command(tmp_path, machine, installs):
    # The command's first step, up to the venv, run by bash on a PATH of stand-ins: `id` says
    # the uid, `apt-get` writes down what it was asked, `chromedriver` is there or not.
    step = readme_test_command().split("python3 -m venv")[0]
    bin_, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_.mkdir()
    tools = {"id": f"echo {machine['uid']}"}
    if machine["apt"]:
        tools["apt-get"] = f'echo "$@" >> {log}'
    if machine["driver"]:
        tools["chromedriver"] = "true"
    for name, body in tools.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    env = dict(os.environ, PATH=str(bin_))
    proc = subprocess.run(["/bin/bash", "-c", step + "echo next-step"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "next-step", (proc.stdout, proc.stderr)
    asked = log.read_text().splitlines() if log.exists() else []
    assert asked == (["update -qq", INSTALL.removeprefix("apt-get ")] if installs else []), asked
