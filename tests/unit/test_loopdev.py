import struct

from vmcraft_tasks.craft.nbd.loopdev import LO_FLAGS_READ_ONLY, pack_loop_config


def test_loop_config_layout_matches_the_kernel_struct():
    data = pack_loop_config(7, 1048576, 52428800, name="/run/vmcraft/attach-x/disk", readonly=True)
    # struct loop_config is 304 bytes on every Linux architecture.
    assert len(data) == 304
    fd, block_size = struct.unpack_from("=II", data, 0)
    offset, sizelimit = struct.unpack_from("=QQ", data, 8 + 24)
    flags = struct.unpack_from("=I", data, 8 + 40 + 12)[0]
    name = data[8 + 56 : 8 + 56 + 64].rstrip(b"\0")
    assert (fd, block_size, offset, sizelimit) == (7, 0, 1048576, 52428800)
    assert flags == LO_FLAGS_READ_ONLY
    assert name == b"/run/vmcraft/attach-x/disk"


def test_writable_loop_has_no_read_only_flag_and_long_names_are_cut():
    data = pack_loop_config(3, 0, 4096, name="/x" * 100, readonly=False)
    assert struct.unpack_from("=I", data, 8 + 40 + 12)[0] == 0
    assert len(data[8 + 56 : 8 + 56 + 64].rstrip(b"\0")) == 63
