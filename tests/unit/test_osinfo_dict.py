from vmcraft_tasks.craft.inspect.fstab import FstabEntry, ResolvedFstabEntry
from vmcraft_tasks.craft.inspect.model import OSInfo


def test_osinfo_survives_its_json_form():
    entry = ResolvedFstabEntry(
        entry=FstabEntry("/dev/sda3", "/", "ext4", ("errors=remount-ro",), 0, 1),
        kind="device",
        resolved_partition=3,
        how="device-name",
    )
    info = OSInfo(
        root_partition=3,
        type="linux",
        distro="debian",
        major=12,
        minor=5,
        hostname="web01",
        fstab=(entry,),
        notes=("a note",),
    )
    assert OSInfo.from_dict(info.to_dict()) == info
