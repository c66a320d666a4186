"""Migration reports: per-VM records, the batch summary, its Markdown, and the files."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.outfiles import ForeignFileError, OutputNameError, OutputPathError
from vmcraft_tasks.reports import (
    REPORT_VERSION,
    batch_summary,
    disk_entry,
    fix_entry,
    render_markdown,
    report_filename,
    vm_report,
    write_reports,
)

GIB = 1 << 30
STARTED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
FINISHED = STARTED + timedelta(minutes=12, seconds=5)

DEBIAN = OSInfo(
    root_partition=1,
    type="linux",
    distro="debian",
    product_name="Debian GNU/Linux 12 (bookworm)",
    major=12,
    minor=0,
)


def web01() -> dict[str, Any]:
    return vm_report(
        vm_id="web01",
        status="done",
        host="host-a",
        timings={"attach": 1.5, "convert": 60.25, "inspect": 2.0},
        disks=[
            disk_entry(
                source="/src/web01.vmdk",
                source_format="vmdk",
                target="/images/web01-vda.qcow2",
                format="qcow2",
                virtual_size=20 * GIB,
                source_size=8 * GIB,
                target_size=7 * GIB,
                conversion_s=58.0004,
                source_identity="sha256:abc",
                source_unchanged=True,
            )
        ],
        partitions=[{"number": 1, "size_sectors": 2048, "sector_size": 512}],
        filesystems=[{"partition": 1, "type": "ext4", "uuid": "u-1", "label": None}],
        mounts={1: "normal"},
        os_facts=[DEBIAN],
        fixes=[
            fix_entry(
                name="fstab",
                target="/etc/fstab",
                before="/dev/sda1 / ext4 defaults 0 1",
                after="UUID=u-1 / ext4 defaults 0 1",
            )
        ],
        libvirt_xml="/out/web01.xml",
    )


def db01() -> dict[str, Any]:
    return vm_report(
        vm_id="db01",
        status="failed",
        error="convert failed on host-b: qemu-img: exit 1 | disk full",
        host="host-b",
        timings={"attach": 2.5, "convert": 10.0},
        disks=[
            disk_entry(source="/src/db01-a.vmdk", target="/i/db01-vda.qcow2", format="qcow2"),
            disk_entry(source="/src/db01-b.vmdk", target="/i/db01-vdb.raw", format="raw"),
        ],
        fixes=[fix_entry(name="grub", before="x", after="y", applied=False, note="skipped")],
    )


def app01() -> dict[str, Any]:
    return vm_report(vm_id="app01", status="cancelled")


def summary_of(*vms: dict[str, Any]) -> dict[str, Any]:
    return batch_summary("b-42", list(vms), STARTED, FINISHED)


# --- vm_report --------------------------------------------------------------------------


def test_vm_report_fields_and_order() -> None:
    report = web01()
    assert list(report) == [
        "report_version",
        "vm_id",
        "status",
        "error",
        "host",
        "timings",
        "total_s",
        "disks",
        "partitions",
        "filesystems",
        "mounts",
        "lvs",
        "volumes",
        "scan_notes",
        "os",
        "fixes",
        "guestcaps",
        "initramfs",
        "data_only",
        "notes",
        "libvirt_xml",
        "boot_check",
    ]
    assert report["report_version"] == REPORT_VERSION
    assert report["total_s"] == 63.75
    assert list(report["timings"]) == ["attach", "convert", "inspect"]
    assert report["disks"][0]["conversion_s"] == 58.0
    assert report["disks"][0]["source_unchanged"] is True
    assert report["mounts"] == {"1": {"strategy": "normal"}}
    assert report["os"] == [DEBIAN.to_dict()]
    assert report["fixes"][0]["before"].startswith("/dev/sda1")
    assert report["fixes"][0]["applied"] is True
    assert report["libvirt_xml"] == "/out/web01.xml"
    json.dumps(report, allow_nan=False)


def test_vm_report_takes_library_objects() -> None:
    partition = Partition(
        number=1,
        start_sector=2048,
        size_sectors=4096,
        sector_size=512,
        type="83",
        table="dos",
    )
    report = vm_report(vm_id="v", status="done", partitions=[partition], os_facts=[DEBIAN])
    assert report["partitions"] == [partition.to_dict()]
    assert report["os"][0]["distro"] == "debian"


def test_mounts_are_keyed_by_string_in_numeric_order() -> None:
    report = vm_report(
        vm_id="v",
        status="done",
        mounts={10: "ro-noload", 2: {"strategy": "normal", "ok": True}, "9": "ntfs-force"},
    )
    assert list(report["mounts"]) == ["2", "9", "10"]
    assert report["mounts"]["2"] == {"strategy": "normal", "ok": True}
    assert report["mounts"]["10"] == {"strategy": "ro-noload"}


def test_vm_report_without_timings() -> None:
    report = app01()
    assert report["timings"] == {}
    assert report["total_s"] is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "5", True])
def test_bad_timings_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="convert"):
        vm_report(vm_id="v", status="done", timings={"convert": bad})


def test_empty_vm_id_is_refused() -> None:
    with pytest.raises(ValueError):
        vm_report(vm_id="", status="done")


# --- batch_summary ----------------------------------------------------------------------


def test_summary_counts_and_times() -> None:
    summary = summary_of(web01(), db01(), app01())
    assert summary["batch_id"] == "b-42"
    assert summary["started_at"] == "2024-05-01T12:00:00Z"
    assert summary["finished_at"] == "2024-05-01T12:12:05Z"
    assert summary["wall_s"] == 725.0
    assert summary["counts"] == {
        "total": 3,
        "by_status": {"cancelled": 1, "done": 1, "failed": 1},
    }
    steps = summary["timings"]["steps"]
    assert list(steps) == ["attach", "convert", "inspect"]
    assert steps["attach"] == {"count": 2, "sum_s": 4.0, "median_s": 2.0, "max_s": 2.5}
    assert steps["convert"] == {"count": 2, "sum_s": 70.25, "median_s": 35.125, "max_s": 60.25}
    assert steps["inspect"] == {"count": 1, "sum_s": 2.0, "median_s": 2.0, "max_s": 2.0}
    # app01 never ran a step: it is not a zero-second VM in the medians.
    assert summary["timings"]["total"] == {
        "count": 2,
        "sum_s": 76.25,
        "median_s": 38.125,
        "max_s": 63.75,
    }
    json.dumps(summary, allow_nan=False)


def test_summary_failures_have_reasons() -> None:
    summary = summary_of(web01(), db01(), app01())
    assert summary["failures"] == [
        {
            "vm_id": "app01",
            "status": "cancelled",
            "host": None,
            "reason": "ended cancelled without a reason",
        },
        {
            "vm_id": "db01",
            "status": "failed",
            "host": "host-b",
            "reason": "convert failed on host-b: qemu-img: exit 1 | disk full",
        },
    ]


def test_summary_rows_are_sorted_and_compact() -> None:
    summary = summary_of(web01(), db01(), app01())
    assert [row["vm_id"] for row in summary["vms"]] == ["app01", "db01", "web01"]
    web = summary["vms"][2]
    assert web == {
        "vm_id": "web01",
        "status": "done",
        "host": "host-a",
        "os": "Debian GNU/Linux 12 (bookworm)",
        "disks": 1,
        "lvs": 0,
        "lvs_unexposed": 0,
        "disk_bytes": 20 * GIB,
        "fixes": 1,
        "devices": None,
        "fixes_applied": 1,
        "total_s": 63.75,
        "reason": None,
        "boot": None,
    }
    db = summary["vms"][1]
    assert db["disk_bytes"] is None  # sizes unknown: no misleading partial total
    assert (db["fixes"], db["fixes_applied"]) == (1, 0)


def test_os_label_falls_back_to_distro_and_version() -> None:
    roots = [
        OSInfo(root_partition=1, type="linux", distro="rocky", major=9, minor=3),
        OSInfo(root_partition=5, type="windows"),
    ]
    summary = summary_of(vm_report(vm_id="v", status="done", os_facts=roots))
    assert summary["vms"][0]["os"] == "rocky 9.3; windows"


def test_empty_batch() -> None:
    summary = batch_summary("empty", [], 0.0, 0.0)
    assert summary["counts"] == {"total": 0, "by_status": {}}
    assert summary["timings"]["total"] == {
        "count": 0,
        "sum_s": 0,
        "median_s": None,
        "max_s": None,
    }
    assert summary["failures"] == []
    assert "**0 VMs**." in render_markdown(summary)


def test_epoch_and_aware_times_agree() -> None:
    plus2 = timezone(timedelta(hours=2))
    a = batch_summary("b", [], STARTED.timestamp(), FINISHED.timestamp())
    b = batch_summary("b", [], STARTED.astimezone(plus2), FINISHED)
    assert (a["started_at"], a["wall_s"]) == (b["started_at"], b["wall_s"])


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        batch_summary("b", [], datetime(2024, 1, 1), FINISHED)


def test_duplicate_vm_is_refused() -> None:
    with pytest.raises(ValueError, match="web01"):
        summary_of(web01(), web01())


# --- Markdown ---------------------------------------------------------------------------


def table_rows(markdown: str, header_start: str) -> list[str]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def split_cells(row: str) -> list[str]:
    """Split a GFM table row the way GitHub does: on pipes not escaped by a backslash."""
    cells, cell, i = [], "", 1
    body = row.strip()
    while i < len(body) - 1:
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) - 1:
            cell += body[i : i + 2]
            i += 2
            continue
        if ch == "|":
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
        i += 1
    cells.append(cell.strip())
    return cells


def test_markdown_vm_table() -> None:
    md = render_markdown(summary_of(web01(), db01(), app01()))
    assert md.startswith("# Batch b-42\n")
    assert "**3 VMs**: 1 cancelled, 1 done, 1 failed." in md
    assert "| VM | status | host | OS | devices | disks | fixes | time | reason |" in md
    rows = [split_cells(r) for r in table_rows(md, "| VM |")]
    assert [r[0] for r in rows] == ["app01", "db01", "web01"]
    assert all(len(r) == 9 for r in rows)
    assert rows[2] == [
        "web01",
        "done",
        "host-a",
        "Debian GNU/Linux 12 (bookworm)",
        "-",
        "1 (20.0 GiB)",
        "1",
        "1m 04s",
        "",
    ]
    assert rows[1][5:8] == ["2", "0 of 1", "12.5 s"]
    assert rows[0][2] == "-" and rows[0][7] == "-"


def test_markdown_escapes_pipes_in_reasons() -> None:
    md = render_markdown(summary_of(db01()))
    row = table_rows(md, "| VM |")[0]
    assert "qemu-img: exit 1 \\| disk full" in row
    cells = split_cells(row)
    assert len(cells) == 9
    assert cells[8] == "convert failed on host-b: qemu-img: exit 1 \\| disk full"


def test_markdown_escapes_backslashes_newlines_and_every_cell() -> None:
    report = vm_report(
        vm_id="odd|vm",
        status="failed",
        host="h|1",
        error="C:\\|x\nsecond line\r\nthird",
    )
    row = table_rows(render_markdown(summary_of(report)), "| VM |")[0]
    assert "\n" not in row
    cells = split_cells(row)
    assert len(cells) == 9
    assert cells[0] == "odd\\|vm"
    assert cells[2] == "h\\|1"
    # The trailing backslash of "C:\" is doubled, so the pipe after it stays escaped.
    assert cells[8] == "C:\\\\\\|x second line third"


def test_data_only_vms_and_devices_show_in_the_table() -> None:
    data = vm_report(vm_id="data1", status="done", data_only=True)
    compat = {"block_bus": "sata", "net_model": "e1000e", "reasons": ["no virtio_blk"]}
    win = vm_report(vm_id="win1", status="done", guestcaps=compat)
    rows = {
        r[0]: r
        for r in map(split_cells, table_rows(render_markdown(summary_of(data, win)), "| VM |"))
    }
    assert rows["data1"][3:5] == ["data-only", "-"]
    assert rows["win1"][4] == "sata/e1000e (compatibility)"


def test_markdown_step_table() -> None:
    md = render_markdown(summary_of(web01(), db01()))
    assert "## Time per step" in md
    rows = [split_cells(r) for r in table_rows(md, "| step |")]
    assert rows == [
        ["attach", "2", "4.0 s", "2.0 s", "2.5 s"],
        ["convert", "2", "1m 10s", "35.1 s", "1m 00s"],
        ["inspect", "1", "2.0 s", "2.0 s", "2.0 s"],
        ["**all steps**", "2", "1m 16s", "38.1 s", "1m 04s"],
    ]


def test_markdown_renders_from_json_round_trip() -> None:
    summary = summary_of(web01(), db01(), app01())
    assert render_markdown(json.loads(json.dumps(summary))) == render_markdown(summary)


def test_long_durations() -> None:
    report = vm_report(vm_id="big", status="done", timings={"convert": 2 * 3600 + 5 * 60 + 7})
    row = split_cells(table_rows(render_markdown(summary_of(report)), "| VM |")[0])
    assert row[7] == "2h 05m"


# --- files ------------------------------------------------------------------------------


def test_write_reports(tmp_path: Path) -> None:
    vms = [web01(), db01()]
    summary = summary_of(*vms)
    out = tmp_path / "reports" / "b-42"
    written = write_reports(str(out), vms, summary, roots=[str(tmp_path)])
    assert [os.path.basename(p) for p in written] == [
        "web01.json",
        "db01.json",
        "summary.json",
        "summary.md",
    ]
    visible = sorted(p for p in os.listdir(out) if not p.startswith("."))
    assert visible == ["db01.json", "summary.json", "summary.md", "web01.json"]
    assert json.loads((out / "web01.json").read_text()) == vms[0]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "summary.md").read_text() == render_markdown(summary)
    # Reports are for the operators' group, not for everyone; new folders are 0750.
    assert (out / "summary.json").stat().st_mode & 0o777 == 0o640
    assert out.stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "reports").stat().st_mode & 0o777 == 0o750


def test_write_reports_replaces_its_own_files(tmp_path: Path) -> None:
    write_reports(str(tmp_path), [web01()], summary_of(web01()), roots=[str(tmp_path)])
    again = web01() | {"status": "failed"}
    write_reports(str(tmp_path), [again], summary_of(again), roots=[str(tmp_path)])
    assert json.loads((tmp_path / "web01.json").read_text())["status"] == "failed"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_write_reports_never_replaces_a_file_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "web01.json").write_text("someone else's")
    with pytest.raises(ForeignFileError, match=r"web01\.json exists and was not made by"):
        write_reports(str(tmp_path), [web01()], summary_of(web01()), roots=[str(tmp_path)])
    assert (tmp_path / "web01.json").read_text() == "someone else's"
    assert not (tmp_path / "summary.json").exists()  # nothing of the set was written


def test_write_reports_refuses_a_folder_outside_its_roots(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match="outside the output roots"):
        write_reports("/etc", [], summary_of(), roots=[str(tmp_path)])


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_reports(str(tmp_path), [], summary_of(), roots=[str(tmp_path)])
    before = (tmp_path / "summary.json").read_text()

    def broken_rename(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        write_reports(str(tmp_path), [], summary_of(web01()), roots=[str(tmp_path)])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert (tmp_path / "summary.json").read_text() == before


@pytest.mark.parametrize(
    ("vm_id", "name"),
    [("web01", "web01.json"), ("a/b c", "a_b_c.json"), ("..", "_..json"), (".x", "_x.json")],
)
def test_report_filename(vm_id: str, name: str) -> None:
    assert report_filename(vm_id) == name


@pytest.mark.parametrize(
    "ids",
    [["summary"], ["a/b", "a_b"]],
    ids=["reserved", "clash"],
)
def test_name_clashes_write_nothing(tmp_path: Path, ids: list[str]) -> None:
    vms = [vm_report(vm_id=vm, status="done") for vm in ids]
    with pytest.raises(OutputNameError, match=r"reserved|overwrite"):
        write_reports(str(tmp_path / "out"), vms, summary_of(*vms), roots=[str(tmp_path)])
    assert not (tmp_path / "out").exists()


# --- guest text in the Markdown -----------------------------------------------------------


def test_markdown_keeps_guest_control_characters_and_markup_out() -> None:
    hostile = OSInfo(
        root_partition=1,
        type="linux",
        distro="debian",
        product_name="\x1b[31mDebian\x1b[0m\x07\x00 \x9b2J<img src=x onerror=alert(1)>"
        "\u202e[click](http://evil/) *x* `y`\nfake | row",
    )
    report = vm_report(
        vm_id="web_01",
        status="failed",
        os_facts=[hostile],
        error="fix fstab could not be applied: <b>\x1b]0;title\x07</b>" + "x" * 5000,
    )
    md = render_markdown(summary_of(report))
    (row,) = table_rows(md, "| VM |")
    cells = split_cells(row)
    assert len(cells) == 9
    assert cells[0] == "web_01"  # an intraword underscore stays as typed
    assert all(ch.isprintable() for ch in row)  # no ESC, BEL, NUL, C1, RTL override
    assert "<" not in md and ">" not in md.replace("&gt;", "")
    assert "\\[click\\](http://evil/)" in cells[3] and "\\*x\\* \\`y\\`" in cells[3]
    assert "&lt;img src=x onerror=alert(1)&gt;" in cells[3] and "\\|" in cells[3]
    assert len(cells[8]) < 400  # the full reason is in the JSON
    assert summary_of(report)["vms"][0]["os"] == hostile.product_name  # JSON keeps it raw


def test_the_summary_counts_a_vms_lvs_and_the_ones_not_exposed() -> None:
    lv = {"vg": "rl", "vg_uuid": "v", "lv_uuid": "u", "size": 1, "volume": 100000}
    report = vm_report(
        vm_id="rhel01",
        status="failed",
        error="no operating system root found on any volume",
        lvs=[{**lv, "lv": "root", "reason": "thin volume"}, {**lv, "lv": "swap", "reason": None}],
        scan_notes=["rl/root: thin volume"],
    )
    assert report["lvs"][0]["reason"] == "thin volume" and report["scan_notes"]
    (row,) = summary_of(report)["vms"]
    assert (row["lvs"], row["lvs_unexposed"]) == (2, 1)
    assert "| 0, 2 LVs (1 not exposed) |" in render_markdown(summary_of(report))


def test_a_boot_checked_batch_gets_a_boot_column() -> None:
    passed = {
        **web01(),
        "boot_check": {
            "result": "pass",
            "mode": "direct-kernel",
            "accel": "tcg",
            "seconds": 74.2,
            "reason": "login-prompt",
        },
    }
    failed = vm_report(
        vm_id="db01",
        status="failed",
        error="boot check failed",
        boot_check={"result": "fail", "mode": "bootloader", "reason": "emergency-mode"},
    )
    md = render_markdown(summary_of(passed, failed))
    assert "| boot | reason |" in md
    assert "pass 74 s (tcg, direct-kernel)" in md and "fail: emergency-mode" in md
    assert "| boot |" not in render_markdown(summary_of(web01()))
