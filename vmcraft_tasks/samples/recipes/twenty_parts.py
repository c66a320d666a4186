"""Twenty ext4 partitions of 8 MiB on GPT."""

from __future__ import annotations

from vmcraft_tasks.samples.recipes.gpt_ext4 import ext4_gpt
from vmcraft_tasks.samples.toolkit import BuiltImage

TWENTY_ID = 9


def twenty_parts_raw() -> BuiltImage:
    return ext4_gpt("twenty-parts", 20, 8, TWENTY_ID)
