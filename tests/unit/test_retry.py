import pytest

from vmcraft_tasks.craft.errors import AttachError, TransientAttachError
from vmcraft_tasks.craft.retry import RetryPolicy, call_with_retry


class Flaky:
    def __init__(self, failures: int, error=TransientAttachError) -> None:
        self.failures = failures
        self.error = error
        self.calls: list[int] = []

    def __call__(self, attempt: int) -> str:
        self.calls.append(attempt)
        if len(self.calls) <= self.failures:
            raise self.error("img", f"failure {len(self.calls)}")
        return "attached"


def test_transient_failures_are_retried_and_attempts_counted():
    sleeps: list[float] = []
    cleanups: list[int] = []
    func = Flaky(failures=2)
    result, attempts = call_with_retry(
        func,
        RetryPolicy(attempts=3, base_s=0.5, cap_s=4.0),
        cleanup=lambda: cleanups.append(1),
        sleep=sleeps.append,
    )
    assert (result, attempts) == ("attached", 3)
    assert func.calls == [1, 2, 3]
    assert len(cleanups) == 2
    assert len(sleeps) == 2 and all(0 <= s <= 4.0 for s in sleeps)


def test_gives_up_after_policy_attempts_with_count_on_error():
    func = Flaky(failures=10)
    with pytest.raises(TransientAttachError) as info:
        call_with_retry(func, RetryPolicy(attempts=3), sleep=lambda s: None)
    assert info.value.attempts == 3
    assert func.calls == [1, 2, 3]


def test_permanent_failure_is_not_retried():
    func = Flaky(failures=1, error=AttachError)
    with pytest.raises(AttachError):
        call_with_retry(func, RetryPolicy(attempts=5), sleep=lambda s: None)
    assert func.calls == [1]


def test_backoff_is_capped():
    sleeps: list[float] = []
    with pytest.raises(TransientAttachError):
        call_with_retry(
            Flaky(failures=99), RetryPolicy(attempts=8, base_s=1.0, cap_s=2.0), sleep=sleeps.append
        )
    assert max(sleeps) <= 2.0


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
