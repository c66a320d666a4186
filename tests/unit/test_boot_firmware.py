"""Finding the OVMF firmware for a UEFI test boot (craft/boot/firmware.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmcraft_tasks.craft.boot.firmware import FirmwareNotFoundError, find_ovmf
from vmcraft_tasks.craft.errors import VMCraftError

# What bookworm's ovmf package ships in /usr/share/OVMF.
BOOKWORM = (
    "OVMF_CODE.fd",
    "OVMF_CODE.ms.fd",
    "OVMF_CODE.secboot.fd",
    "OVMF_CODE_4M.fd",
    "OVMF_CODE_4M.ms.fd",
    "OVMF_CODE_4M.secboot.fd",
    "OVMF_CODE_4M.snakeoil.fd",
    "OVMF_VARS.fd",
    "OVMF_VARS.ms.fd",
    "OVMF_VARS_4M.fd",
    "OVMF_VARS_4M.ms.fd",
    "OVMF_VARS_4M.snakeoil.fd",
)


def _firmware_dir(root: Path, names: tuple[str, ...]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"")
    return str(root)


def test_the_4m_pair_without_secure_boot_is_preferred(tmp_path: Path) -> None:
    ovmf = _firmware_dir(tmp_path / "OVMF", BOOKWORM)
    assert find_ovmf([ovmf]) == (f"{ovmf}/OVMF_CODE_4M.fd", f"{ovmf}/OVMF_VARS_4M.fd")


def test_the_2m_pair_when_there_is_no_4m_build(tmp_path: Path) -> None:
    ovmf = _firmware_dir(tmp_path / "OVMF", ("OVMF_CODE.fd", "OVMF_VARS.fd"))
    assert find_ovmf([ovmf]) == (f"{ovmf}/OVMF_CODE.fd", f"{ovmf}/OVMF_VARS.fd")


def test_a_pair_is_never_mixed(tmp_path: Path) -> None:
    # 4M code without its VARS: the 2M pair, not 4M code with 2M vars.
    ovmf = _firmware_dir(tmp_path / "OVMF", ("OVMF_CODE_4M.fd", "OVMF_CODE.fd", "OVMF_VARS.fd"))
    assert find_ovmf([ovmf]) == (f"{ovmf}/OVMF_CODE.fd", f"{ovmf}/OVMF_VARS.fd")


def test_later_directories_are_searched(tmp_path: Path) -> None:
    empty = _firmware_dir(tmp_path / "empty", ())
    ovmf = _firmware_dir(tmp_path / "OVMF", ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"))
    assert find_ovmf([empty, ovmf])[0] == f"{ovmf}/OVMF_CODE_4M.fd"


def test_secure_boot_builds_alone_are_not_used(tmp_path: Path) -> None:
    only_secboot = ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd", "OVMF_VARS_4M.snakeoil.fd")
    ovmf = _firmware_dir(tmp_path / "OVMF", only_secboot)
    with pytest.raises(FirmwareNotFoundError):
        find_ovmf([ovmf])


def test_missing_firmware_names_the_package(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FirmwareNotFoundError) as caught:
        find_ovmf([missing])
    error = caught.value
    assert isinstance(error, VMCraftError)
    assert error.package == "ovmf"
    assert error.dirs == (missing,)
    assert f"{missing}/OVMF_CODE_4M.fd" in error.searched
    assert "apt-get install ovmf" in str(error)
    assert missing in str(error)
