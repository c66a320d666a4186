"""Realistic sample disk images built with sfdisk, mkfs.* and qemu-img, for demos and tests."""
