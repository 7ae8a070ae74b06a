"""fetch.classify: what a storage response holds for a ranged GET, from its status and headers."""

from __future__ import annotations

import httpx
import pytest

from vapifs.errors import KeyRejected, VersionChanged
from vapifs.fetch import Body, _Refused, _Retry, classify
from vapifs.version import Version

ETAG = '"v1"'
V1 = Version(1000, ETAG)


def answer(status: int, **headers: str) -> httpx.Response:
    fields = {"etag": ETAG, **headers}
    return httpx.Response(status, headers={k.replace("_", "-"): v for k, v in fields.items()})


def test_a_206_of_exactly_the_range_asked_is_read_to_its_end() -> None:
    response = answer(206, content_range="bytes 100-199/1000", content_length="100")
    assert classify(response, 100, 200, None) == Body(V1, 200, to_the_end=True)
    assert classify(response, 100, 200, V1) == Body(V1, 200, to_the_end=True)


def test_a_206_of_a_prefix_of_the_range_is_taken_as_far_as_it_goes() -> None:
    # Honest but short (a host that caps ranges): the run goes on from byte 150 next time.
    response = answer(206, content_range="bytes 100-149/1000")
    assert classify(response, 100, 200, None) == Body(V1, 150)


@pytest.mark.parametrize(
    "content_range",
    [
        "bytes 101-199/1000",  # does not start where asked
        "bytes 99-199/1000",
        "bytes 100-200/1000",  # past what was asked
        "bytes 100-1000/1000",  # past the size it names
    ],
)
def test_a_206_of_other_bytes_is_retried(content_range: str) -> None:
    with pytest.raises(_Retry, match="not the 100-199 asked"):
        classify(answer(206, content_range=content_range), 100, 200, None)


@pytest.mark.parametrize("content_range", ["", "bytes 100-199/*", "bytes=100-199/1000", "items"])
def test_a_206_without_a_usable_content_range_is_retried(content_range: str) -> None:
    with pytest.raises(_Retry, match="without a usable Content-Range"):
        classify(answer(206, content_range=content_range), 100, 200, None)


def test_a_200_to_a_ranged_request_is_the_whole_body_skipped_to_the_offset() -> None:
    body = classify(answer(200, content_length="1000"), 100, 200, None)
    assert body == Body(V1, 1000, skip=100)
    with pytest.raises(_Retry, match="no Content-Length"):
        classify(answer(200), 100, 200, None)


def test_an_encoded_body_is_retried_unless_it_is_the_stored_bytes() -> None:
    # Encoded on the way (a length that is not the range's, or a whole body): not the bytes.
    on_the_way = answer(206, content_range="bytes 0-99/1000", content_encoding="gzip")
    with pytest.raises(_Retry, match="gzip-encoded body"):
        classify(on_the_way, 0, 100, None)
    whole = answer(200, content_length="1000", content_encoding="gzip")
    with pytest.raises(_Retry, match="ignored Range and sent a gzip-encoded body"):
        classify(whole, 0, 100, None)
    # Stored gzipped: the range is exactly the stored bytes, taken raw.
    stored = answer(
        206, content_range="bytes 0-99/1000", content_length="100", content_encoding=" GZIP "
    )
    assert classify(stored, 0, 100, None) == Body(V1, 100, to_the_end=True, encoded=True)
    identity = answer(206, content_range="bytes 0-99/1000", content_encoding="identity")
    assert classify(identity, 0, 100, None) == Body(V1, 100)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410])
def test_a_refused_url_is_resolved_again(status: int) -> None:
    with pytest.raises(_Refused, match=f"HTTP {status}"):
        classify(answer(status), 0, 100, V1)


def test_a_refused_key_on_the_api_itself_is_key_rejected() -> None:
    with pytest.raises(KeyRejected):
        classify(answer(401), 0, 100, V1, direct=True)
    with pytest.raises(_Refused):
        classify(answer(403), 0, 100, V1, direct=True)


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_busy_or_failing_storage_is_retried_after_its_retry_after(status: int) -> None:
    with pytest.raises(_Retry, match=f"HTTP {status}") as raised:
        classify(answer(status, retry_after="7"), 0, 100, V1)
    assert raised.value.retry_after == 7.0
    with pytest.raises(_Retry) as raised:
        classify(answer(status), 0, 100, V1)
    assert raised.value.retry_after is None


@pytest.mark.parametrize("status", [204, 304, 302])
def test_any_other_status_is_retried(status: int) -> None:
    with pytest.raises(_Retry, match=f"storage answered HTTP {status}"):
        classify(answer(status), 0, 100, None)


def test_a_new_etag_or_size_is_a_version_change() -> None:
    new_etag = answer(206, content_range="bytes 0-99/1000", etag='"v2"')
    with pytest.raises(VersionChanged, match="a/b changed on the server") as raised:
        classify(new_etag, 0, 100, V1, what="a/b")
    assert raised.value.new_version == Version(1000, '"v2"')
    new_size = answer(200, content_length="999")
    with pytest.raises(VersionChanged):
        classify(new_size, 0, 100, V1)
    # A weak ETag is the same version.
    weak = answer(206, content_range="bytes 0-99/1000", etag='W/"v1"')
    assert classify(weak, 0, 100, V1).version == V1


def test_a_416_tells_the_size_of_an_artifact_read_past_its_end() -> None:
    past = answer(416, content_range="bytes */1000")
    assert classify(past, 1000, 1100, None) == Body(V1, 1000)
    with pytest.raises(VersionChanged, match="changed size"):
        classify(answer(416, content_range="bytes */900"), 950, 1000, V1)
    # Within the size it names, or without one: the host is in trouble.
    with pytest.raises(_Retry, match="HTTP 416"):
        classify(past, 500, 600, None)
    with pytest.raises(_Retry, match="HTTP 416"):
        classify(answer(416), 1000, 1100, None)
    with pytest.raises(_Retry, match="HTTP 416"):
        classify(answer(416, content_range="bytes */1000"), 1000, 1100, V1)
