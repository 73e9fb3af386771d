"""The envelope's cheap message ids and timestamps (issue 14) against what they replaced (``uuid.uuid4``,
``datetime.now(UTC).strftime``): same form, same clock, ids unique across threads and forked processes; and ``Envelope.decode`` (its checks unrolled) accepting
and refusing what it did, with the same reasons."""

from __future__ import annotations

import dataclasses
import multiprocessing
import re
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import MalformedMessage
from bus import envelope as envelope_module
from bus.envelope import Envelope, _new_id, utc_now
from tests import codec_reference as ref

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def test_ids_are_uuid4_text() -> None:
    for _ in range(3000):  # more than one buffer of the kernel's bytes
        text = _new_id()
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # lowercase, dashed: as str(uuid.uuid4())
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert len(ref.new_id()) == len(text)


def test_ids_are_unique_across_threads() -> None:
    per_thread: list[list[str]] = [[] for _ in range(8)]

    def make(into: list[str]) -> None:
        for _ in range(2000):
            into.append(_new_id())

    threads = [threading.Thread(target=make, args=(ids,)) for ids in per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for ids in per_thread for i in ids]
    assert len(set(every)) == len(every) == 16000


def _child_ids(queue: multiprocessing.Queue[list[str]]) -> None:
    queue.put([_new_id() for _ in range(50)])


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    _new_id()  # the parent has a buffer with ids left in it
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    child = context.Process(target=_child_ids, args=(queue,))
    child.start()
    theirs = queue.get(timeout=10)
    child.join(timeout=10)
    ours = [_new_id() for _ in range(50)]
    assert not set(theirs) & set(ours)


def test_utc_now_reads_the_clock_as_datetime_now_did() -> None:
    for _ in range(200):
        before = ref.utc_now()
        now = utc_now()
        after = ref.utc_now()
        assert TIMESTAMP.fullmatch(now), now
        assert before <= now <= after  # same-length RFC 3339 texts order as their times
    assert datetime.fromisoformat(now).tzinfo == UTC


@pytest.mark.parametrize(
    "ns",
    [
        1_764_633_599_999_999_999,  # the last microsecond of a day...
        1_764_633_600_000_000_000,  # ...and the first of the next, a second later: the cached text moves on
        1_764_633_600_000_000_999,  # nanoseconds are floored, as datetime.now does
        946_684_800_123_456_789,
    ],
)
def test_utc_now_formats_as_strftime_did(monkeypatch: pytest.MonkeyPatch, ns: int) -> None:
    monkeypatch.setattr(envelope_module.time, "time_ns", lambda: ns)
    expected = (EPOCH + timedelta(microseconds=ns // 1000)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert utc_now() == expected


def test_a_new_envelope_gets_an_id_and_a_timestamp() -> None:
    first, second = Envelope("T", "s", {}), Envelope("T", "s", {})
    assert first.message_id != second.message_id
    assert TIMESTAMP.fullmatch(first.created_at)


def test_with_headers_copies_every_field_and_adds_headers() -> None:
    env = Envelope("T", "s", {"a": 1}, correlation_id="c", headers={"x": "1"})
    copy = env.with_headers(**{"delivery-count": "2", "x": "3"})
    assert copy == Envelope("T", "s", {"a": 1}, env.message_id, "c", {"x": "3", "delivery-count": "2"}, env.created_at)
    assert env.headers == {"x": "1"}
    with pytest.raises(TypeError, match="must be a str"):
        env.with_headers(n=1)  # type: ignore[arg-type]


VALID = {
    "message_id": "m-1",
    "type": "T",
    "session_id": "s",
    "correlation_id": "c",
    "created_at": "2026-12-02T00:00:00.000001Z",
    "headers": {"delivery-count": "1"},
    "body": {"a": [1, "2"]},
}
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=8)
    | st.sampled_from(["", "2026-01-01T00:00:00Z"]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=4,
)


def _compare_decode(data: bytes | str) -> None:
    try:
        expected = ref.decode(data)
    except MalformedMessage as exc:
        with pytest.raises(MalformedMessage) as caught:
            Envelope.decode(data)
        assert str(caught.value) == str(exc)
        return
    got = dataclasses.asdict(Envelope.decode(data))
    if expected["created_at"] is None:
        assert TIMESTAMP.fullmatch(got.pop("created_at"))
        expected.pop("created_at")
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from([*VALID, "extra"]), JSON_VALUES, max_size=3),
    dropped=st.sets(st.sampled_from(list(VALID)), max_size=2),
)
def test_decode_accepts_and_refuses_as_before(changes: dict[str, Any], dropped: set[str]) -> None:
    raw = {k: v for k, v in {**VALID, **changes}.items() if k not in dropped}
    _compare_decode(orjson.dumps(raw))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[1]",
        "null",
        b'{"type": 1}',
        orjson.dumps({**VALID, "headers": {"a": 1}}),
        orjson.dumps(VALID),
    ],
)
def test_decode_refuses_what_it_refused(data: bytes | str) -> None:
    _compare_decode(data)
