"""Retries with exponential backoff and full jitter, within the call's deadline.

`RetryPolicy` is the public, read-only description; `RetryState` applies it to
one operation. Both clients' retry loops (``client.py``, ``async_client.py``)
ask the same state when to retry and how long to pause, so the rules below
hold for `BrokerClient` and `AsyncBrokerClient` alike:

- What is retried: UNAVAILABLE (no broker listening, broker draining,
  database unreachable or connection lost), CANCELLED that the caller did
  not cause (a stopping gRPC server's, see `is_retryable`), and
  RESOURCE_EXHAUSTED with the
  reason ``POOL_EXHAUSTED`` (the broker's wait queue is full). Nothing else:
  DEADLINE_EXCEEDED means the time is up, the other codes do not change by
  retrying.
- Which operations: the reads, which change nothing: pings, stats,
  ``find_one``, ``count_documents``, ``estimated_document_count`` and
  ``distinct`` (whose stream is read whole before anything is returned),
  and ``find`` and ``aggregate`` until their first documents arrive (a
  stream that fails later raises: restarting it would hand the caller
  documents twice). Not an ``aggregate`` whose pipeline has a ``$out`` or
  ``$merge`` stage: it writes. Inserts only when the client itself made
  every ``_id`` in the call (see `_requests.Insert`). Never the other
  writes (`NEVER_RETRIED`: updates, replaces, deletes, find-and-modify and
  bulk writes): a retry after an attempt whose outcome is unknown could
  apply them twice, and unlike an insert with a new ``_id`` nothing tells
  a second application from the first.
- How long to wait: "full jitter" (AWS Architecture Blog, "Exponential
  Backoff And Jitter", 2015): a uniform random pause in ``[0, cap]``, where
  ``cap = min(max_backoff, initial_backoff * multiplier ** (n - 1))`` before
  the n-th retry. Random pauses keep many workers that failed together from
  retrying together. A ``RetryInfo`` delay from the broker (sent with
  POOL_EXHAUSTED) is the least pause, even above ``max_backoff``.
- The deadline: ``timeout=`` covers every attempt and every pause. A retry is
  made only if, after its pause, at least `MIN_ATTEMPT_S` of the deadline is
  left; otherwise the last error is raised at once, not after sleeping.
- No call is sent with less than `MIN_SEND_S` of the deadline left: the
  operation raises ExecutionTimeout (DEADLINE_EXCEEDED) at once, with
  ``attempts`` counting only the calls that were sent.

Every result and exception says how many attempts were made (``.attempts``).
Each retry is logged at DEBUG on the ``broker_client.retry`` logger; the
record's ``broker_retry`` attribute is a dict of ``attempt`` (the one that
failed), ``delay``, ``left`` (seconds of the deadline left after the pause)
and ``error``.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from broker_client.errors import BrokerError

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "MIN_ATTEMPT_S",
    "MIN_SEND_S",
    "NEVER_RETRIED",
    "RetryPolicy",
    "RetryState",
    "is_retryable",
    "may_retry",
]

log = logging.getLogger("broker_client.retry")

#: A retry is not started with less of the deadline left than this (seconds):
#: it could only end in DEADLINE_EXCEEDED, hiding the error that caused it.
MIN_ATTEMPT_S: Final = 0.01

#: No call is sent with less of the deadline left than this (seconds). gRPC
#: keeps deadlines in whole milliseconds, so a call sent with a few
#: microseconds left may still be answered OK, or DEADLINE_EXCEEDED,
#: depending on which thread runs first; on a busy machine either happens.
#: Such a call could not have reached the database and come back in time, so
#: the client answers it with the timeout itself.
MIN_SEND_S: Final = 0.001


class RetryPolicy:
    """How a client retries calls that failed transiently. Read-only, hashable, picklable.

    Pass one as ``BrokerClient(..., retries=RetryPolicy(...))``, or
    ``retries=None`` to make every call exactly once.

    Attributes:
        max_attempts: how many times an operation is tried in all, the first
            included (default 3; 1 means no retries). Sending the rest of an
            ``insert_many`` after a retry found its first part stored is not
            a new try.
        initial_backoff: the cap on the pause before the first retry, in
            seconds (default 0.05).
        max_backoff: the largest cap on any pause, in seconds (default 1.0).
            A ``RetryInfo`` delay from the broker may exceed it.
        multiplier: how much the cap grows with each retry (default 2.0).
    """

    # A plain class, not a dataclass: importing dataclasses (and inspect,
    # which it needs) would add about 4 ms to importing this package.
    __slots__ = ("initial_backoff", "max_attempts", "max_backoff", "multiplier")
    _FIELDS: Final = ("max_attempts", "initial_backoff", "max_backoff", "multiplier")

    max_attempts: int
    initial_backoff: float
    max_backoff: float
    multiplier: float

    def __init__(
        self,
        max_attempts: int = 3,
        initial_backoff: float = 0.05,
        max_backoff: float = 1.0,
        multiplier: float = 2.0,
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise TypeError(f"max_attempts must be an int, not {type(max_attempts).__name__}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 (1 means no retries), not {max_attempts}")
        numbers = {"initial_backoff": initial_backoff, "max_backoff": max_backoff, "multiplier": multiplier}
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, not {value!r}")
        if initial_backoff < 0:
            raise ValueError(f"initial_backoff must be >= 0 seconds, not {initial_backoff}")
        if max_backoff < initial_backoff:
            raise ValueError(f"max_backoff ({max_backoff}) must be >= initial_backoff ({initial_backoff})")
        if multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, not {multiplier}")
        for name, value in (("max_attempts", max_attempts), *numbers.items()):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RetryPolicy is read-only; make a new one instead of setting {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("RetryPolicy is read-only")

    def _values(self) -> tuple[int, float, float, float]:
        return (self.max_attempts, self.initial_backoff, self.max_backoff, self.multiplier)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RetryPolicy):
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        pairs = zip(self._FIELDS, self._values(), strict=True)
        return "RetryPolicy({})".format(", ".join(f"{name}={value!r}" for name, value in pairs))

    def __reduce__(self) -> tuple[type[RetryPolicy], tuple[int, float, float, float]]:
        return RetryPolicy, self._values()

    def backoff_cap(self, retry: int) -> float:
        """The cap on the pause before retry number ``retry`` (1 for the first)."""
        # A bounded exponent: 2.0 ** 2000 is an OverflowError.
        exponent = min(retry - 1, 64)
        return min(self.max_backoff, self.initial_backoff * self.multiplier**exponent)


#: The clients' default: three tries, pauses of at most 50, 100 ms (then up to 1 s).
DEFAULT_RETRY_POLICY: Final = RetryPolicy()


#: The calls (RPC names) no client retries: they are not idempotent. An
#: Update with ``$inc``, a Delete of "the first match", a FindOneAndModify or
#: a BulkWrite may have been applied by an attempt whose answer was lost.
NEVER_RETRIED: Final = frozenset({"Update", "Delete", "FindOneAndModify", "BulkWrite"})


def may_retry(operation: str) -> bool:
    """False for the calls that are sent once whatever the policy (`NEVER_RETRIED`)."""
    return operation not in NEVER_RETRIED


@functools.cache
def _pool_exhausted() -> str:
    # The contract's name for it. Looked up on the first failure, by when the
    # generated code is loaded anyway: importing this module loads no protobuf.
    from broker_client.proto.broker.v1 import broker_pb2

    return broker_pb2.ErrorReason.Name(broker_pb2.POOL_EXHAUSTED)


def is_retryable(error: BrokerError) -> bool:
    """True for the errors a retry may cure: UNAVAILABLE, CANCELLED, and RESOURCE_EXHAUSTED/POOL_EXHAUSTED.

    CANCELLED reaches the retry loop only from the server's side: the
    caller cannot cancel a blocking call, and an asyncio caller's own
    cancellation is CancelledError, not a BrokerError. A stopping gRPC
    server cancels calls it had taken in but not yet handed to the broker
    (grpc/grpc#41785), which never ran.
    """
    code = error.code
    if code is None:
        return False
    return code.name in {"UNAVAILABLE", "CANCELLED"} or (
        code.name == "RESOURCE_EXHAUSTED" and error.reason == _pool_exhausted()
    )


class RetryState:
    """One operation's attempts, pauses and deadline.

    ``policy=None`` makes `backoff` raise at once: the operation is tried once.
    ``with state:`` around the operation's calls makes a `BrokerError` that
    escapes say how many attempts were made (``.attempts``).
    """

    __slots__ = ("attempts", "deadline", "failures", "operation", "policy")

    def __init__(self, policy: RetryPolicy | None, deadline: float, operation: str) -> None:
        self.policy = policy
        self.deadline = deadline
        self.operation = operation
        #: Calls sent so far.
        self.attempts = 0
        #: Of those, the ones that failed and were retried.
        self.failures = 0

    def __enter__(self) -> RetryState:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        if exc is None:
            return
        from broker_client.errors import BrokerError

        if isinstance(exc, BrokerError):
            exc.attempts = self.attempts

    def fresh(self, operation: str) -> RetryState:
        """A state for another operation that serves this one: its own attempts, the same deadline."""
        return RetryState(self.policy, self.deadline, operation)

    def next_timeout(self) -> float:
        """Count one more attempt; the seconds of the deadline left for it.

        Raises ExecutionTimeout, without counting an attempt, when less than
        `MIN_SEND_S` is left.
        """
        left = self.deadline - time.monotonic()
        if left < MIN_SEND_S:
            import grpc

            from broker_client.errors import ExecutionTimeout

            raise ExecutionTimeout(
                f"{self.operation}: the timeout ran out before the call could be sent "
                f"({max(left, 0.0) * 1000:.3f} ms left); give the operation a longer timeout=",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        self.attempts += 1
        return left

    def backoff(self, error: BrokerError) -> float:
        """The pause before retrying after ``error``; raises ``error`` if it must not be retried."""
        policy = self.policy
        if policy is None or not is_retryable(error) or self.failures + 1 >= policy.max_attempts:
            raise error
        delay = random.random() * policy.backoff_cap(self.failures + 1)
        if error.retry_after is not None and error.reason == _pool_exhausted():
            delay = max(delay, error.retry_after)
        left = self.deadline - time.monotonic() - delay
        if left < MIN_ATTEMPT_S:
            raise error
        self.failures += 1
        log.debug(
            "%s: attempt %d failed (%s); retrying in %.3f s, %.3f s of the deadline left after that",
            self.operation,
            self.attempts,
            error,
            delay,
            left,
            extra={"broker_retry": {"attempt": self.attempts, "delay": delay, "left": left, "error": error}},
        )
        return delay
