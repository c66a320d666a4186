"""mask_url / mask_urls_in: no password of a broker, result or cache URL in a message."""

from __future__ import annotations

import random
import string
from urllib.parse import quote

import pytest

from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.urls import MASK, mask_url, mask_urls_in


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@broker:6379/0", "redis://:***@broker:6379/0"),
        ("redis://worker:s3cret@broker:6379/0", "redis://worker:***@broker:6379/0"),
        ("rediss://worker:s3cret@broker:6380/1", "rediss://worker:***@broker:6380/1"),
        ("redis+sentinel://:s3cret@s1:26379/mymaster", "redis+sentinel://:***@s1:26379/mymaster"),
        # A lone userinfo is a username to redis-py, but often a misplaced password.
        ("redis://s3cret@broker/0", "redis://***@broker/0"),
        ("redis://:s3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("unix://:s3cret@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("redis://broker:6379/0?password=s3cret", "redis://broker:6379/0?password=***"),
        (
            "redis://broker/0?db=1&password=s3cret&socket_timeout=5",
            "redis://broker/0?db=1&password=***&socket_timeout=5",
        ),
        ("redis://:p%40ss%2Fw@broker/0", "redis://:***@broker/0"),  # encoded: still secret
        # Unencoded specials: masked whole, never cut where urllib would stop.
        ("redis://:p@ss:w,rd#x@broker/0", "redis://:***@broker/0"),
        ("redis://:ab/cd?ef@broker/0", "redis://:***@broker/0"),
        ("redis://:ab://cd@broker/0", "redis://:***@broker/0"),  # "://" is no new URL
    ],
)
def test_one_url(url, masked):
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "url",
    [
        "redis://broker:6379/0",
        "redis://127.0.0.1:6379",
        "rediss://broker/0?ssl_cert_reqs=required",
        "redis://@broker/0",  # an empty userinfo: nothing to hide
        "unix:///run/redis.sock?db=2",
        "",
        "no url at all: Connection refused",
    ],
)
def test_what_has_no_secret_is_unchanged(url):
    assert mask_url(url) == url


def test_sentinel_lists_mask_every_member():
    sentinels = "sentinel://:a1@h1:26379;sentinel://:b2@h2:26379;sentinel://h3:26379"
    assert mask_url(sentinels) == (
        "sentinel://:***@h1:26379;sentinel://:***@h2:26379;sentinel://h3:26379"
    )
    with_params = "sentinel://h1:26379?password=a;b;sentinel://h2:26379?password=c"
    # A ";" inside a value is masked with it; the next URL of the list still shows.
    assert (
        mask_url(with_params) == "sentinel://h1:26379?password=***;sentinel://h2:26379?password=***"
    )
    commas = "redis://:a1@h1:6379/0,redis://:b2@h2:6379/0"
    assert mask_url(commas) == "redis://:***@h1:6379/0,redis://:***@h2:6379/0"


def test_urls_inside_messages_and_reprs():
    settings = FleetSettings(
        broker_url="redis://:brokerpw@broker:6379/0",
        result_backend="redis://:resultpw@broker:6379/1",
        cache_url="rediss://cache:cachepw@cache:6380/0",
    )
    text = mask_urls_in(repr(settings))
    for secret in ("brokerpw", "resultpw", "cachepw"):
        assert secret not in text
    assert "broker_url='redis://:***@broker:6379/0'" in text
    assert "cache_url='rediss://cache:***@cache:6380/0'" in text
    message = (
        "Error 111 connecting to broker:6379. Connection refused. "
        "(broker redis://:x1@broker:6379/0, backend redis://u:x2@broker:6379/1)"
    )
    masked = mask_urls_in(message)
    assert "x1" not in masked and "x2" not in masked
    assert masked.startswith("Error 111 connecting to broker:6379. Connection refused. ")


def test_masking_is_idempotent():
    url = "redis://u:s3cret@broker/0?password=again"
    assert mask_url(mask_url(url)) == mask_url(url) == f"redis://u:{MASK}@broker/0?password={MASK}"


@pytest.mark.parametrize("seed", range(20))
def test_no_password_survives_whatever_it_holds(seed):
    """Random passwords of every printable character but whitespace, raw and
    percent-encoded, in every place a URL can carry one."""
    rng = random.Random(seed)
    # "://" is likelier in a password than chance would make it.
    alphabet = [*string.ascii_letters, *string.digits, *string.punctuation, "://"]
    for _ in range(50):
        secret = "S" + "".join(rng.choice(alphabet) for _ in range(rng.randint(6, 24))) + "Z"
        for raw in (secret, quote(secret, safe="")):
            for url in (
                f"redis://:{raw}@broker:6379/0",
                f"rediss://user:{raw}@broker:6379/0",
                f"sentinel://:{raw}@h1:26379;sentinel://:{raw}@h2:26379",
                f"cannot reach redis://:{raw}@broker:6379/0: Connection refused",
            ):
                assert raw not in mask_url(url), url
        # In a query string a password needs "&" and "#" encoded; anything else may stay.
        query_safe = secret.replace("&", "%26").replace("#", "%23")
        assert query_safe not in mask_url(f"redis://broker/0?password={query_safe}&db=1")


def test_fleet_settings_show_no_password_where_celery_prints_them():
    from vmcraft_tasks.config import FleetSettings

    settings = FleetSettings(
        broker_url="redis://:pw-broker-1@h/0",
        result_backend="redis://u:pw-results-2@h/1",
        cache_url="rediss://:pw-cache-3@h/2",
    )
    shown = repr(settings)
    assert "pw-" not in shown and shown.count(":***@") == 3
