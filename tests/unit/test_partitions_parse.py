import json

import pytest

from vmcraft_tasks.craft.errors import PartitionError
from vmcraft_tasks.craft.partitions import data_partitions, parse_sfdisk_json

GPT = {
    "partitiontable": {
        "label": "gpt",
        "id": "6FA67282-3EE1-1746-A4D7-18A50398108A",
        "device": "disk",
        "unit": "sectors",
        "sectorsize": 512,
        "partitions": [
            {
                "node": "disk2",
                "start": 104448,
                "size": 102400,
                "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
                "uuid": "21A6CDF7-D52A-3C41-9B74-D12D4549D73B",
                "name": "root",
            },
            {
                "node": "disk1",
                "start": 2048,
                "size": 102400,
                "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                "uuid": "1E4EEA38-1981-334C-9F42-206AE51538FA",
                "name": "esp",
            },
        ],
    }
}

MBR = {
    "partitiontable": {
        "label": "dos",
        "id": "0x1234abcd",
        "device": "/run/vmcraft/attach-x/disk",
        "unit": "sectors",
        "sectorsize": 512,
        "partitions": [
            {
                "node": "/run/vmcraft/attach-x/disk1",
                "start": 2048,
                "size": 204800,
                "type": "83",
                "bootable": True,
            },
            {"node": "/run/vmcraft/attach-x/disk2", "start": 206848, "size": 800000, "type": "5"},
            {"node": "/run/vmcraft/attach-x/disk5", "start": 208896, "size": 100000, "type": "83"},
            {"node": "/run/vmcraft/attach-x/disk6", "start": 310000, "size": 100000, "type": "c"},
        ],
    }
}


def test_gpt_records_sorted_with_names_and_uuids():
    parts = parse_sfdisk_json(json.dumps(GPT))
    assert [p.number for p in parts] == [1, 2]
    esp = parts[0]
    assert esp.name == "esp"
    assert esp.uuid == "1e4eea38-1981-334c-9f42-206ae51538fa"
    assert esp.offset_bytes == 2048 * 512
    assert esp.size_bytes == 102400 * 512
    assert esp.type == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
    assert not esp.extended and not esp.logical


def test_mbr_extended_and_logical_partitions():
    parts = parse_sfdisk_json(json.dumps(MBR))
    by_number = {p.number: p for p in parts}
    assert by_number[1].bootable
    assert by_number[2].extended
    assert by_number[5].logical and by_number[6].logical
    # blkid's PARTUUID for MBR is the disk id plus the partition number.
    assert by_number[5].uuid == "1234abcd-05"
    assert [p.number for p in data_partitions(parts)] == [1, 5, 6]


def test_empty_output_means_no_table():
    assert parse_sfdisk_json("") == []


def test_garbage_raises_partition_error():
    with pytest.raises(PartitionError, match="unreadable sfdisk output"):
        parse_sfdisk_json("{not json")


def test_round_trip_through_dict():
    part = parse_sfdisk_json(json.dumps(GPT))[1]
    from vmcraft_tasks.craft.partitions import Partition

    assert Partition.from_dict(part.to_dict()) == part
