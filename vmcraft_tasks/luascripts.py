"""The fleet's Lua scripts, kept as `.lua` files in `vmcraft_tasks/lua/`.

Each file starts with a comment saying what its KEYS and ARGV are; the keys come
from `vmcraft_tasks.keys`, and the keys of one call always share one hash tag (one
cluster slot). `register` hands a script to redis-py, which runs it by EVALSHA and
loads it again by itself after a SCRIPT FLUSH or a Redis restart.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import redis
from redis.commands.core import Script

PACKAGE = "vmcraft_tasks"
DIRECTORY = "lua"


def names() -> list[str]:
    """Every script shipped, by name (the file name without `.lua`)."""
    folder = resources.files(PACKAGE).joinpath(DIRECTORY)
    return sorted(
        entry.name.removesuffix(".lua") for entry in folder.iterdir() if entry.name.endswith(".lua")
    )


@cache
def load(name: str) -> str:
    """The source of the script `name` (`batch_claim` -> `lua/batch_claim.lua`)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"not a script name: {name!r}")
    return resources.files(PACKAGE).joinpath(DIRECTORY, f"{name}.lua").read_text(encoding="utf-8")


def register(client: redis.Redis, name: str) -> Script:
    """The script `name`, callable as `script(keys=[...], args=[...])` on `client`.

    The fleet's stores read text: `client` must decode responses (`TypeError`
    otherwise, rather than ids that quietly come back as bytes).
    """
    require_text(client)
    return client.register_script(load(name))


def require_text(client: redis.Redis) -> None:
    """`TypeError` unless `client` was made with `decode_responses=True`."""
    if not client.get_encoder().decode_responses:
        raise TypeError(
            "the fleet's Redis clients read text: create them with decode_responses=True"
        )
