"""The systemd files: the unit verifies, its exposure stays low, sysusers creates the user.

Runs where systemd's tools are installed (Debian: the systemd package; .ci/run installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "webhookd.service"
SYSUSERS = ROOT / "systemd" / "webhookd.sysusers"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def unit_copy(tmp_path: Path) -> Path:
    # ExecStart must name an existing binary for `verify`: point it at this venv's webhookd.
    exe = Path(sys.executable).parent / "webhookd"
    text = UNIT.read_text().replace("/usr/local/bin/webhookd", str(exe))
    copy = tmp_path / "webhookd.service"
    copy.write_text(text)
    return copy


def test_unit_declares_what_the_daemon_relies_on() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "StateDirectory=webhookd", "RuntimeDirectory=webhookd", "User=webhookd",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "ProtectHome=yes", "PrivateTmp=yes",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SystemCallFilter=@system-service",
                 "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text, line


@needs_analyze
@pytest.mark.parametrize("name", ["webhookd.service", "webhookd-follow-postfix.service", "webhookd-milter.service"])
def test_units_verify(tmp_path: Path, name: str) -> None:
    exe = Path(sys.executable).parent / "webhookd"
    copy = tmp_path / name
    copy.write_text((ROOT / "systemd" / name).read_text().replace("/usr/local/bin/webhookd", str(exe)))
    p = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert name not in p.stderr, p.stderr  # no warnings about our unit


@needs_analyze
def test_unit_exposure_is_low(tmp_path: Path) -> None:
    p = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit_copy(tmp_path))],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for webhookd.service: ([0-9.]+)", p.stdout)
    assert m, p.stdout[-2000:] + p.stderr
    assert float(m.group(1)) <= 2.0, p.stdout[-3000:]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_sysusers_creates_user_and_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    p = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert re.search(r"^webhookd:x:\d+:\d+:.*:/var/lib/webhookd:/usr/sbin/nologin$",
                     (tmp_path / "etc" / "passwd").read_text(), re.M)
    assert re.search(r"^webhookd:x:\d+:", (tmp_path / "etc" / "group").read_text(), re.M)
