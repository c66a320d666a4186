"""Pure parsers for os-release and the older release files."""

from __future__ import annotations

import pytest

from vmcraft_tasks.craft.inspect.osrelease import (
    DistroInfo,
    distro_from_os_release,
    normalise_distro_id,
    parse_debian_version,
    parse_lsb_release,
    parse_os_release,
    parse_redhat_release,
    parse_suse_release,
    parse_version,
    refine_minor,
)

DEBIAN_12 = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"""

UBUNTU_2204 = """\
PRETTY_NAME="Ubuntu 22.04.3 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
ID=ubuntu
ID_LIKE=debian
"""

ROCKY_93 = """\
NAME="Rocky Linux"
VERSION="9.3 (Blue Onyx)"
ID="rocky"
ID_LIKE="rhel centos fedora"
VERSION_ID="9.3"
PRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"
"""


def test_parse_os_release_handles_quotes_comments_and_escapes() -> None:
    text = (
        "# comment\n"
        "\n"
        "ID=debian\n"
        "NAME='Single Quoted'\n"
        'PRETTY_NAME="Say \\"hi\\" \\$HOME"\n'
        "not a line\n"
        "1BAD=x\n"
        "EMPTY=\n"
    )
    fields = parse_os_release(text)
    assert fields == {
        "ID": "debian",
        "NAME": "Single Quoted",
        "PRETTY_NAME": 'Say "hi" $HOME',
        "EMPTY": "",
    }


def test_parse_os_release_survives_unbalanced_quotes() -> None:
    assert parse_os_release('NAME="Broken\n')["NAME"] == "Broken"


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("12", (12, 0)),
        ("9.3", (9, 3)),
        ("22.04", (22, 4)),
        ("7.9.2009", (7, 9)),
        ("15-SP4", (15, 0)),
        ("rolling", (None, None)),
        ("", (None, None)),
        (None, (None, None)),
    ],
)
def test_parse_version(version: str | None, expected: tuple[int | None, int | None]) -> None:
    assert parse_version(version) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("debian", "debian"),
        ("rhel", "rhel"),
        ("Rocky", "rocky"),
        ("almalinux", "almalinux"),
        ("opensuse-leap", "opensuse"),
        ("opensuse-tumbleweed", "opensuse"),
        ("sles", "sles"),
        ("sled", "sles"),
        ("ol", "oraclelinux"),
        ("arch", "archlinux"),
        ("alpine", "alpinelinux"),
        ("somethingnew", "somethingnew"),
    ],
)
def test_normalise_distro_id(raw: str, expected: str) -> None:
    assert normalise_distro_id(raw) == expected


def test_distro_from_os_release_debian() -> None:
    info = distro_from_os_release(parse_os_release(DEBIAN_12))
    assert info == DistroInfo("debian", "Debian GNU/Linux 12 (bookworm)", 12, 0, "os-release", "12")
    assert not info.has_minor


def test_distro_from_os_release_ubuntu_and_rocky() -> None:
    ubuntu = distro_from_os_release(parse_os_release(UBUNTU_2204))
    assert ubuntu is not None
    assert (ubuntu.distro, ubuntu.major, ubuntu.minor) == ("ubuntu", 22, 4)
    rocky = distro_from_os_release(parse_os_release(ROCKY_93))
    assert rocky is not None
    assert (rocky.distro, rocky.product_name, rocky.major, rocky.minor) == (
        "rocky",
        "Rocky Linux 9.3 (Blue Onyx)",
        9,
        3,
    )
    assert rocky.to_dict()["source"] == "os-release"


def test_distro_from_os_release_falls_back_to_name_and_needs_id() -> None:
    info = distro_from_os_release({"ID": "arch", "NAME": "Arch Linux"})
    assert info is not None
    assert (info.distro, info.product_name, info.major, info.minor) == (
        "archlinux",
        "Arch Linux",
        None,
        None,
    )
    assert distro_from_os_release({"NAME": "no id"}) is None


@pytest.mark.parametrize(
    ("text", "distro", "major", "minor"),
    [
        ("Red Hat Enterprise Linux Server release 7.9 (Maipo)\n", "rhel", 7, 9),
        ("Red Hat Enterprise Linux release 8.10 (Ootpa)\n", "rhel", 8, 10),
        ("CentOS Linux release 7.9.2009 (Core)\n", "centos", 7, 9),
        ("CentOS Stream release 9\n", "centos", 9, 0),
        ("Rocky Linux release 9.3 (Blue Onyx)\n", "rocky", 9, 3),
        ("AlmaLinux release 8.9 (Midnight Oncilla)\n", "almalinux", 8, 9),
        ("Fedora release 39 (Thirty Nine)\n", "fedora", 39, 0),
        ("Oracle Linux Server release 8.9\n", "oraclelinux", 8, 9),
        ("Some Clone release 5.1\n", "redhat-based", 5, 1),
    ],
)
def test_parse_redhat_release(text: str, distro: str, major: int, minor: int) -> None:
    info = parse_redhat_release(text)
    assert info is not None
    assert (info.distro, info.major, info.minor) == (distro, major, minor)
    assert info.product_name == text.strip()
    assert info.source == "redhat-release"


def test_parse_redhat_release_empty() -> None:
    assert parse_redhat_release("\n\n") is None


def test_parse_debian_version() -> None:
    info = parse_debian_version("12.5\n")
    assert info is not None
    assert (info.distro, info.major, info.minor, info.has_minor) == ("debian", 12, 5, True)
    sid = parse_debian_version("trixie/sid\n")
    assert sid is not None
    assert (sid.major, sid.minor, sid.has_minor) == (None, None, False)
    assert parse_debian_version("") is None


def test_parse_suse_release_sles_patchlevel() -> None:
    text = "SUSE Linux Enterprise Server 11 (x86_64)\nVERSION = 11\nPATCHLEVEL = 4\n"
    info = parse_suse_release(text)
    assert info is not None
    assert (info.distro, info.product_name, info.major, info.minor) == (
        "sles",
        "SUSE Linux Enterprise Server 11",
        11,
        4,
    )


def test_parse_suse_release_opensuse() -> None:
    info = parse_suse_release("openSUSE 13.1 (x86_64)\nVERSION = 13.1\nCODENAME = Bottle\n")
    assert info is not None
    assert (info.distro, info.major, info.minor) == ("opensuse", 13, 1)


def test_parse_lsb_release() -> None:
    text = (
        "DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE=20.04\nDISTRIB_CODENAME=focal\n"
        'DISTRIB_DESCRIPTION="Ubuntu 20.04.6 LTS"\n'
    )
    info = parse_lsb_release(text)
    assert info is not None
    assert (info.distro, info.product_name, info.major, info.minor, info.source) == (
        "ubuntu",
        "Ubuntu 20.04.6 LTS",
        20,
        4,
        "lsb-release",
    )
    assert parse_lsb_release("DISTRIB_RELEASE=1\n") is None


def test_refine_minor_debian_point_release() -> None:
    info = distro_from_os_release(parse_os_release(DEBIAN_12))
    assert info is not None
    refined = refine_minor(info, parse_debian_version("12.5"))
    assert (refined.major, refined.minor) == (12, 5)
    assert refined.product_name == "Debian GNU/Linux 12 (bookworm)"


def test_refine_minor_ignores_disagreeing_or_vaguer_detail() -> None:
    info = distro_from_os_release(parse_os_release(DEBIAN_12))
    assert info is not None
    assert refine_minor(info, parse_debian_version("11.9")).minor == 0
    assert refine_minor(info, parse_debian_version("bookworm/sid")).minor == 0
    assert refine_minor(info, None) is info
    rocky = distro_from_os_release(parse_os_release(ROCKY_93))
    assert rocky is not None
    # An explicit minor in os-release is not overridden by an older release file.
    assert refine_minor(rocky, parse_redhat_release("Rocky Linux release 9.1")).minor == 3
