"""Integration tests: real images, real qemu-nbd/nbdfuse, loop devices and mounts (root)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmcraft_tasks.craft.vmcraft import VMCraft

pytestmark = pytest.mark.integration

if os.geteuid() != 0:  # pragma: no cover - the suite runs as root here and in CI
    pytest.skip("integration tests need root (loop devices, mounts)", allow_module_level=True)


@pytest.fixture
def open_disk() -> Iterator[list[VMCraft]]:
    """Attached disks are shut down even when a test fails half-way."""
    opened: list[VMCraft] = []
    yield opened
    for g in opened:
        g.shutdown()


@pytest.fixture
def flaky_qemu_nbd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A FAKE qemu-nbd wrapper put first on PATH: fails its first N starts, then runs the real one.

    Transient failures are injected at the process layer, where they happen in
    production (a socket path in use, a helper dying early).
    """

    def install(
        failures: int, message: str = "qemu-nbd: Failed to bind socket: Address already in use"
    ) -> Path:
        bindir = tmp_path / "fakebin"
        bindir.mkdir(exist_ok=True)
        counter = tmp_path / "qemu-nbd-starts"
        counter.write_text("0")
        real = "/usr/bin/qemu-nbd"
        script = bindir / "qemu-nbd"
        script.write_text(
            "#!/bin/bash\n"
            f"n=$(( $(cat {counter}) + 1 )); echo $n > {counter}\n"
            f'if [ "$n" -le {failures} ]; then echo "{message}" >&2; exit 1; fi\n'
            f'exec {real} "$@"\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
        return counter

    return install
