"""Console verdicts on console text recorded from real boots of the bootable samples.

The excerpts below are byte-for-byte serial output of Debian 12 under qemu TCG
(escapes, CR CR LF and all), cut down to the part that decides.
"""

from __future__ import annotations

import pytest

from vmcraft_tasks.craft.boot.console import (
    MAX_LINE,
    MAX_WARNINGS,
    ConsoleWatcher,
    Reason,
    clean,
    judge,
)

GRUB_MENU = (
    "\x1b[H\x1b[J\x1b[1;1H\x1b[?25l\x1b[m\x1b[H\x1b[J\x1b[1;1H\x1b[2;24HGNU GRUB  version "
    "2.06-13+deb12u2\n\r\n\r\x1b[m\x1b[4;2H+------------------------------------------+"
    "\x1b[5;2H|\x1b[5;79H|\x1b[22;1H   The highlighted entry will be executed automatically "
    "in 0s.                 \x1b[5;78H\x1b[?25h\x1b[H\x1b[J\x1b[1;1H  Booting `Debian "
    "GNU/Linux, with Linux 6.1.0-50-amd64'\n\r\n\rLoading Linux 6.1.0-50-amd64 ...\n\r"
    "Loading initial ramdisk ...\n\r"
    "[    0.000000] Linux version 6.1.0-50-amd64 (debian-kernel@lists.debian.org)\r\n"
    "[    0.400240] ..TIMER: vector=0x30 apic1=0 pin1=2 apic2=-1 pin2=-1\r\n"
)

# Variant (a) on SATA: sees /dev/sda as on VMware.
LOGIN_AFTER_CLEAN_BOOT = (
    GRUB_MENU + "[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39msystemd-logind.service\x1b[0m - "
    "User Login Management.\r\r\n"
    "[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mgetty.target\x1b[0m - Login "
    "Prompts.\r\r\n"
    "[\x1b[0;32m  OK  \x1b[0m] Finished \x1b[0;1;39me2scrub_reap.serv…ine ext4 Metadata Check "
    "Snapshots.\r\r\n"
    "[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m - Multi-User "
    "System.\r\r\n"
    "[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mgraphical.target\x1b[0m - Graphical "
    "Interface.\r\r\n"
    "\r\r\nDebian GNU/Linux 12 deb12-bios ttyS0\r\n\r\ndeb12-bios login: "
)

# Variant (a) on virtio: /dev/sda2 and /dev/sda4 never appear.
EMERGENCY = (
    "\x1bM\r\x1b[K[ \x1b[0;31m*\x1b[0;1;31m*\x1b[0m\x1b[0;31m*  \x1b[0m] (1 of 2) Job "
    "dev-sda4.device/start running (1min 29s / 1min 30s)\r\r\n"
    "\x1bM\r\x1b[K[\x1b[0;1;31m TIME \x1b[0m] Timed out waiting for device "
    "\x1b[0;1;39mdev-sda2.device\x1b[0m - /dev/sda2.\r\r\n"
    "\x1b[K[\x1b[0;1;38;5;185mDEPEND\x1b[0m] Dependency failed for \x1b[0;1;39msyst… - File "
    "System Check on /dev/sda2.\r\r\n"
    "[\x1b[0;1;38;5;185mDEPEND\x1b[0m] Dependency failed for \x1b[0;1;39mboot.mount\x1b[0m - "
    "/boot.\r\r\n"
    "[\x1b[0;1;38;5;185mDEPEND\x1b[0m] Dependency failed for \x1b[0;1;39mloca…s.target\x1b[0m - "
    "Local File Systems.\r\r\n"
    "[\x1b[0;1;31m TIME \x1b[0m] Timed out waiting for device \x1b[0;1;39mdev-sda4.device"
    "\x1b[0m - /dev/sda4.\r\r\n"
    "[\x1b[0;1;38;5;185mDEPEND\x1b[0m] Dependency failed for \x1b[0;1;39mdev-sda4.swap\x1b[0m - "
    "/dev/sda4.\r\r\n"
    "[\x1b[0;1;38;5;185mDEPEND\x1b[0m] Dependency failed for \x1b[0;1;39mswap.target\x1b[0m - "
    "Swaps.\r\r\n"
    "[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mgetty.target\x1b[0m - Login "
    "Prompts.\r\r\n"
    "[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39memergency.service\x1b[0m - Emergency "
    "Shell.\r\r\n"
    "[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39memergency.target\x1b[0m - Emergency "
    "Mode.\r\r\n"
    'You are in emergency mode. After logging in, type "journalctl -xb" to view\r\n'
    'system logs, "systemctl reboot" to reboot, "systemctl default" or "exit"\r\n'
    "to boot into default mode.\r\nGive root password for maintenance\r\n"
    "(or press Control-D to continue): "
)

# Variant (b) on virtio: the initramfs has no virtio_blk.
INITRAMFS = (
    "Begin: Waiting for root file system ... Begin: Running /scripts/local-block ... done.\r\n"
    "Begin: Running /scripts/local-block ... done.\r\ndone.\r\n"
    "Gave up waiting for root file system device.  Common problems:\r\n"
    " - Boot args (cat /proc/cmdline)\r\n"
    "   - Check rootdelay= (did the system wait long enough?)\r\n"
    " - Missing modules (cat /proc/modules; ls /dev)\r\n"
    "ALERT!  UUID=b0070002-0000-4000-9000-000000000003 does not exist.  Dropping to a shell!\r\n"
    "\r\n\r\nBusyBox v1.35.0 (Debian 1:1.35.0-4+deb12u1+b1) built-in shell (ash)\r\n"
    "Enter 'help' for a list of built-in commands.\r\n\r\n(initramfs) \x1b[6n"
)

# A MODULES=list initramfs without ext4, on SATA: the disk is found but cannot be mounted.
INITRAMFS_NO_FS_MODULE = (
    "Warning: fsck not present, so skipping root file system\r\n"
    "mount: mounting /dev/sda3 on /root failed: No such device\r\n"
    "Failed to mount /dev/sda3 as root file system.\r\n\r\n\r\n"
    "BusyBox v1.35.0 (Debian 1:1.35.0-4+deb12u1+b1) built-in shell (ash)\r\n"
    "Enter 'help' for a list of built-in commands.\r\n\r\n(initramfs) \x1b[6n"
)

PANIC = (
    '[    2.912000] VFS: Cannot open root device "sda3" or unknown-block(0,0): error -6\r\n'
    '[    2.913000] Please append a correct "root=" boot option; here are the available '
    "partitions:\r\n"
    "[    2.914000] Kernel panic - not syncing: VFS: Unable to mount root fs on "
    "unknown-block(0,0)\r\n"
    "[    2.915000] CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.0-50-amd64 #1\r\n"
)

SEABIOS_NO_DISK = (
    "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n"
    "Booting from Hard Disk...\r\nBoot failed: could not read the boot disk\r\n\r\n"
    "No bootable device.  Retrying in 60 seconds.\r\n"
)

# What a /boot that fails to mount but is not needed for login looks like.
LOGIN_AFTER_FAILED_UNIT = (
    "[\x1b[0;1;31mFAILED\x1b[0m] Failed to mount \x1b[0;1;39mboot.mount\x1b[0m - /boot.\r\r\n"
    "See 'systemctl status boot.mount' for details.\r\r\n"
    "[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mgetty.target\x1b[0m - Login "
    "Prompts.\r\r\n"
    "\r\r\nDebian GNU/Linux 12 deb12-bios ttyS0\r\n\r\ndeb12-bios login: "
)


def test_clean_strips_escapes_and_keeps_line_breaks() -> None:
    text = "[\x1b[0;1;31m TIME \x1b[0m] Timed out\r\r\n\x1bM\x1b[K(initramfs) \x1b[6n\x07"
    assert clean(text) == "[ TIME ] Timed out\r\r\n(initramfs) "


def test_clean_boot_passes_at_the_default_target() -> None:
    verdict = judge(LOGIN_AFTER_CLEAN_BOOT, seconds=36.0)
    assert verdict is not None
    assert verdict.result == "pass"
    assert verdict.reason is Reason.DEFAULT_TARGET
    assert verdict.evidence == ("[  OK  ] Reached target multi-user.target - Multi-User System.",)
    assert verdict.seconds == 36.0


def test_until_login_waits_past_the_default_target_for_the_prompt() -> None:
    verdict = judge(LOGIN_AFTER_CLEAN_BOOT, until="login")
    assert verdict is not None
    assert (verdict.result, verdict.reason) == ("pass", Reason.LOGIN_PROMPT)
    assert verdict.evidence == ("deb12-bios login:",)
    assert judge(LOGIN_AFTER_CLEAN_BOOT.split("Debian GNU/Linux 12")[0], until="login") is None


def test_until_login_still_fails_on_failures() -> None:
    emergency = judge(EMERGENCY, until="login")
    failed_unit = judge(LOGIN_AFTER_FAILED_UNIT, until="login")
    assert emergency is not None and failed_unit is not None
    assert emergency.reason is Reason.EMERGENCY_MODE
    assert failed_unit.reason is Reason.FAILED_UNITS


def test_login_prompt_passes_without_target_lines() -> None:
    # A guest booted with `quiet` shows no systemd status, only the prompt.
    verdict = judge("Debian GNU/Linux 12 web01 ttyS0\r\n\r\nweb01 login: ")
    assert verdict is not None
    assert (verdict.result, verdict.reason) == ("pass", Reason.LOGIN_PROMPT)
    assert verdict.evidence == ("web01 login:",)


def test_getty_target_and_logind_are_not_a_login_prompt() -> None:
    text = (
        "[  OK  ] Reached target getty.target - Login Prompts.\r\n"
        "[  OK  ] Started systemd-logind.service - User Login Management.\r\n"
        "Last login: Mon Mar  4 10:00:00 on ttyS0\r\n"
    )
    assert judge(text) is None


def test_emergency_mode_fails_with_the_timed_out_devices_as_evidence() -> None:
    verdict = judge(EMERGENCY, seconds=115.0)
    assert verdict is not None
    assert (verdict.result, verdict.reason) == ("fail", Reason.EMERGENCY_MODE)
    assert verdict.evidence[0] == (
        "[ TIME ] Timed out waiting for device dev-sda2.device - /dev/sda2."
    )
    assert "[ TIME ] Timed out waiting for device dev-sda4.device - /dev/sda4." in (
        verdict.evidence
    )
    assert "[DEPEND] Dependency failed for boot.mount - /boot." in verdict.evidence
    # Decided as soon as systemd switched to emergency.target, before the prompt.
    assert verdict.evidence[-1] == "[  OK  ] Reached target emergency.target - Emergency Mode."
    assert not any("Job dev-sda4.device/start running" in line for line in verdict.evidence)


@pytest.mark.parametrize(
    "line",
    [
        'You are in emergency mode. After logging in, type "journalctl -xb" to view',
        'You are in rescue mode. After logging in, type "journalctl -xb" to view',
        "Give root password for maintenance",
        "Press Enter for maintenance",
        "Cannot open access to console, the root account is locked.",
    ],
)
def test_each_emergency_banner_fails(line: str) -> None:
    verdict = judge(line + "\r\n")
    assert verdict is not None
    assert (verdict.result, verdict.reason) == ("fail", Reason.EMERGENCY_MODE)
    assert verdict.evidence == (line,)


def test_initramfs_shell_fails_at_the_alert_with_the_wait_as_evidence() -> None:
    verdict = judge(INITRAMFS, seconds=45.0)
    assert verdict is not None
    assert (verdict.result, verdict.reason) == ("fail", Reason.INITRAMFS_SHELL)
    assert verdict.evidence == (
        "Gave up waiting for root file system device.  Common problems:",
        "ALERT!  UUID=b0070002-0000-4000-9000-000000000003 does not exist.  Dropping to a shell!",
    )


def test_initramfs_shell_after_a_failed_root_mount_names_the_mount() -> None:
    verdict = judge(INITRAMFS_NO_FS_MODULE)
    assert verdict is not None
    assert (verdict.result, verdict.reason) == ("fail", Reason.INITRAMFS_SHELL)
    assert verdict.evidence == (
        "mount: mounting /dev/sda3 on /root failed: No such device",
        "Failed to mount /dev/sda3 as root file system.",
        "(initramfs)",
    )


def test_initramfs_prompt_alone_fails() -> None:
    verdict = judge("Enter 'help' for a list of built-in commands.\r\n\r\n(initramfs) ")
    assert verdict is not None
    assert verdict.reason is Reason.INITRAMFS_SHELL
    assert verdict.evidence == ("(initramfs)",)


def test_kernel_panic_fails() -> None:
    verdict = judge(PANIC)
    assert verdict is not None
    assert (verdict.result, verdict.reason) == ("fail", Reason.KERNEL_PANIC)
    assert verdict.evidence[-1].endswith(
        "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"
    )


def test_no_bootable_device_fails() -> None:
    verdict = judge(SEABIOS_NO_DISK)
    assert verdict is not None
    assert (verdict.result, verdict.reason) == ("fail", Reason.NO_BOOT_DEVICE)
    assert verdict.evidence == ("No bootable device.  Retrying in 60 seconds.",)


def test_grub_error_then_rescue_prompt_fails_in_the_bootloader() -> None:
    verdict = judge(
        "error: no such device: b0070001-0000-4000-9000-000000000002.\r\n"
        "Entering rescue mode...\r\ngrub rescue> "
    )
    assert verdict is not None
    assert (verdict.result, verdict.reason) == ("fail", Reason.BOOTLOADER)
    assert verdict.evidence == (
        "error: no such device: b0070001-0000-4000-9000-000000000002.",
        "grub rescue>",
    )


def test_login_prompt_after_a_failed_unit_fails() -> None:
    verdict = judge(LOGIN_AFTER_FAILED_UNIT)
    assert verdict is not None
    assert (verdict.result, verdict.reason) == ("fail", Reason.FAILED_UNITS)
    assert verdict.evidence == (
        "[FAILED] Failed to mount boot.mount - /boot.",
        "deb12-bios login:",
    )


def test_default_target_after_a_timeout_fails() -> None:
    text = (
        "[ TIME ] Timed out waiting for device dev-sdb1.device - /dev/sdb1.\r\n"
        "[  OK  ] Reached target multi-user.target - Multi-User System.\r\n"
    )
    verdict = judge(text)
    assert verdict is not None
    assert (verdict.result, verdict.reason) == ("fail", Reason.FAILED_UNITS)


def test_nothing_decided_while_booting() -> None:
    assert judge(GRUB_MENU) is None
    assert judge(INITRAMFS.split("Gave up", maxsplit=1)[0]) is None


def test_byte_by_byte_feeding_decides_like_whole_text() -> None:
    # Serial reads split lines, escapes and UTF-8 characters (the ellipsis) anywhere.
    texts = (EMERGENCY, INITRAMFS, INITRAMFS_NO_FS_MODULE, LOGIN_AFTER_CLEAN_BOOT)
    for text in (*texts, LOGIN_AFTER_FAILED_UNIT, SEABIOS_NO_DISK):
        whole = judge(text)
        watcher = ConsoleWatcher()
        data = text.encode()
        verdict = None
        for i in range(len(data)):
            verdict = watcher.feed_bytes(data[i : i + 1], seconds=float(i))
            if verdict is not None:
                break
        assert verdict is not None and whole is not None
        assert (verdict.result, verdict.reason, verdict.evidence) == (
            whole.result,
            whole.reason,
            whole.evidence,
        )


def test_verdict_is_decided_at_the_first_outcome_and_then_fixed() -> None:
    watcher = ConsoleWatcher()
    first = watcher.feed(INITRAMFS, seconds=45.0)
    assert first is not None
    again = watcher.feed(LOGIN_AFTER_CLEAN_BOOT, seconds=99.0)
    assert again is first
    assert watcher.finish("fail", Reason.TIMEOUT, 100.0) is first


def test_finish_reports_warnings_tail_and_note() -> None:
    watcher = ConsoleWatcher()
    assert watcher.feed(INITRAMFS.split("ALERT!", maxsplit=1)[0], seconds=40.0) is None
    verdict = watcher.finish("fail", Reason.SILENCE, 160.0, "no console output for 120 s")
    assert (verdict.result, verdict.reason, verdict.seconds) == ("fail", Reason.SILENCE, 160.0)
    assert verdict.evidence[0] == "Gave up waiting for root file system device.  Common problems:"
    assert verdict.evidence[-2] == "- Missing modules (cat /proc/modules; ls /dev)"
    assert verdict.evidence[-1] == "no console output for 120 s"


def test_warnings_are_capped() -> None:
    watcher = ConsoleWatcher()
    text = "".join(f"[FAILED] Failed to start unit{i}.service.\r\n" for i in range(50))
    assert watcher.feed(text, seconds=1.0) is None
    assert len(watcher.warnings) == MAX_WARNINGS


def test_verdict_as_dict() -> None:
    verdict = judge(SEABIOS_NO_DISK, seconds=3.14159)
    assert verdict is not None
    assert verdict.as_dict() == {
        "result": "fail",
        "reason": "no-boot-device",
        "evidence": ["No bootable device.  Retrying in 60 seconds."],
        "seconds": 3.1,
    }
    assert not verdict.passed


def test_an_endless_line_is_judged_in_pieces() -> None:
    watcher = ConsoleWatcher()
    for _ in range(10):
        assert watcher.feed("x" * MAX_LINE, seconds=1.0) is None
    assert len(watcher._pending) <= MAX_LINE
    verdict = watcher.feed("\r\nKernel panic - not syncing: Attempted to kill init!\r\n", 2.0)
    assert verdict is not None and verdict.reason is Reason.KERNEL_PANIC


def test_grubs_headless_video_mode_message_is_not_a_warning() -> None:
    """Debian's GRUB `linux` asks for a video mode; a headless UEFI boot has none."""
    text = "error: no suitable video mode found.\r\nBooting a command list\r\ndeb12-uefi login: "
    verdict = judge(text, 80.0, until="login")
    assert verdict is not None and verdict.result == "pass", verdict
    missing = judge("error: file '/vmlinuz' not found.\r\ndeb12 login: ", 80.0, until="login")
    assert missing is not None and missing.result == "fail"
