"""api.VapiClient against a mocked API, plus the retry and redaction code it relies on."""

from __future__ import annotations

import email.utils
import logging
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import trio

from vapifs.api import VapiClient, describe
from vapifs.errors import KeyRejected, NetworkError, NotFound, ProtocolError
from vapifs.redact import REDACTOR, RedactingFilter, Redactor, redact_url
from vapifs.retry import RetryPolicy, parse_retry_after
from vapifs.urlbook import Resolution

API = "http://api.test"
KEY = "sk-api-test-0d9c4b7e2a"
POLICY = RetryPolicy(attempts=5, base_delay=0.2, max_delay=4.0, max_retry_after=10.0)
SIGNED = "https://storage.test/rec.wav?X-Amz-Signature=deadbeefcafe&X-Amz-Expires=1800"

Answer = Callable[[httpx.Request], httpx.Response]


class FakeApi:
    """Replays a script of answers (the last one repeats) and records every request."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request)

    def script(self, *answers: Answer) -> None:
        self.answers = list(answers)


def status(code: int, **kwargs: object) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, **kwargs)  # type: ignore[arg-type]

    return answer


def body(content: object) -> Answer:
    return status(200, json=content)


def raises(exc: type[httpx.TransportError]) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        raise exc("boom", request=request)

    return answer


@pytest.fixture
def fake() -> FakeApi:
    return FakeApi(body([]))


@pytest.fixture
async def api(fake: FakeApi) -> AsyncIterator[VapiClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        yield VapiClient(client, API + "/", KEY, policy=POLICY)


# --- requests -------------------------------------------------------------------------------


async def test_every_request_carries_the_key(api: VapiClient, fake: FakeApi) -> None:
    fake.script(body([]), body({"id": "c1"}), status(302, headers={"Location": SIGNED}))
    await api.list_calls(limit="5")
    await api.get_call("c1")
    await api.resolve("c1", "mono")
    assert [r.headers["authorization"] for r in fake.requests] == [f"Bearer {KEY}"] * 3
    assert [str(r.url) for r in fake.requests] == [
        f"{API}/call?limit=5",
        f"{API}/call/c1",
        f"{API}/call/c1/mono-recording",
    ]
    assert api.attempts == {"list": 1, "get": 1, "resolve": 1}
    assert api.requests == 3


async def test_list_calls_passes_filters_and_drops_odd_items(
    api: VapiClient, fake: FakeApi
) -> None:
    calls = [{"id": "a"}, "junk", 3, None, ["x"], {"id": "b", "unknown": {"kept": True}}]
    fake.script(body(calls))
    got = await api.list_calls(limit="100", createdAtLe="2025-01-01T00:00:00.000Z")
    assert got == [{"id": "a"}, {"id": "b", "unknown": {"kept": True}}]
    params = fake.requests[0].url.params
    assert params["limit"] == "100"
    assert params["createdAtLe"] == "2025-01-01T00:00:00.000Z"


async def test_list_calls_not_an_array_is_a_protocol_error(api: VapiClient, fake: FakeApi) -> None:
    fake.script(body({"calls": []}))
    with pytest.raises(ProtocolError, match="array"):
        await api.list_calls()
    assert len(fake.requests) == 1


async def test_get_call_not_an_object_is_a_protocol_error(api: VapiClient, fake: FakeApi) -> None:
    fake.script(body([{"id": "c1"}]))
    with pytest.raises(ProtocolError, match="object"):
        await api.get_call("c1")


async def test_check_key_asks_for_one_call(api: VapiClient, fake: FakeApi) -> None:
    await api.check_key()
    assert len(fake.requests) == 1
    assert fake.requests[0].url.params["limit"] == "1"


# --- resolve --------------------------------------------------------------------------------


async def test_resolve_returns_the_location_without_following_it(
    api: VapiClient, fake: FakeApi
) -> None:
    fake.script(status(302, headers={"Location": SIGNED}))
    resolution = await api.resolve("c1", "stereo")
    assert resolution == Resolution(SIGNED)
    assert resolution.headers == {}
    assert not resolution.direct
    # One request: the storage URL was never fetched (the key must never go there).
    assert [r.url.host for r in fake.requests] == ["api.test"]


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_resolve_any_redirect(api: VapiClient, fake: FakeApi, code: int) -> None:
    fake.script(status(code, headers={"Location": SIGNED}))
    assert (await api.resolve("c1", "pcap")).url == SIGNED
    assert len(fake.requests) == 1


async def test_resolve_relative_location_is_joined(api: VapiClient, fake: FakeApi) -> None:
    fake.script(status(302, headers={"Location": "/storage/c1.wav?sig=1"}))
    assert (await api.resolve("c1", "mono")).url == f"{API}/storage/c1.wav?sig=1"
    fake.script(status(302, headers={"Location": "mono.wav?sig=2"}))
    assert (await api.resolve("c1", "mono")).url == f"{API}/call/c1/mono.wav?sig=2"


async def test_resolve_redirect_without_location(api: VapiClient, fake: FakeApi) -> None:
    fake.script(status(302))
    with pytest.raises(ProtocolError, match="Location"):
        await api.resolve("c1", "mono")
    assert len(fake.requests) == 1


async def test_resolve_200_is_a_direct_resolution(api: VapiClient, fake: FakeApi) -> None:
    fake.script(status(200, content=b"RIFF" + bytes(100)))
    resolution = await api.resolve("c1", "customer")
    assert resolution.direct
    assert resolution.url == f"{API}/call/c1/customer-recording"
    assert resolution.headers == {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(
    ("kind", "endpoint"),
    [
        ("mono", "mono-recording"),
        ("stereo", "stereo-recording"),
        ("customer", "customer-recording"),
        ("assistant", "assistant-recording"),
        ("video", "video-recording"),
        ("logs", "call-logs"),
        ("pcap", "pcap"),
    ],
)
async def test_resolve_endpoints(api: VapiClient, fake: FakeApi, kind: str, endpoint: str) -> None:
    fake.script(status(302, headers={"Location": SIGNED}))
    await api.resolve("c1", kind)
    assert fake.requests[0].url.path == f"/call/c1/{endpoint}"


# --- errors that are not retried ------------------------------------------------------------


@pytest.mark.parametrize("use", ["get", "resolve"])
async def test_401_is_key_rejected_with_the_message(
    api: VapiClient, fake: FakeApi, use: str
) -> None:
    message = "Invalid Key. Hot tip, you may be using the wrong one."
    fake.script(status(401, json={"statusCode": 401, "error": "Unauthorized", "message": message}))
    with pytest.raises(KeyRejected) as info:
        await (api.get_call("c1") if use == "get" else api.resolve("c1", "mono"))
    assert message in str(info.value)
    assert len(fake.requests) == 1


async def test_401_message_list_is_joined(api: VapiClient, fake: FakeApi) -> None:
    fake.script(status(401, json={"message": ["expired", "revoked"]}))
    with pytest.raises(KeyRejected, match=r"refused: expired; revoked$"):
        await api.list_calls()


async def test_401_without_json_body(api: VapiClient, fake: FakeApi) -> None:
    fake.script(status(401, content=b"<html>nope</html>"))
    with pytest.raises(KeyRejected, match="HTTP 401"):
        await api.list_calls()


@pytest.mark.parametrize("use", ["get", "resolve"])
async def test_404_is_not_found(api: VapiClient, fake: FakeApi, use: str) -> None:
    fake.script(status(404, json={"statusCode": 404, "message": "Call not found"}))
    with pytest.raises(NotFound, match="Call not found"):
        await (api.get_call("c1") if use == "get" else api.resolve("c1", "video"))
    assert len(fake.requests) == 1


@pytest.mark.parametrize("use", ["get", "resolve"])
async def test_other_client_errors_are_protocol_errors(
    api: VapiClient, fake: FakeApi, use: str
) -> None:
    fake.script(status(400, json={"message": "id must be a UUID"}))
    with pytest.raises(ProtocolError, match="HTTP 400: id must be a UUID"):
        await (api.get_call("c1") if use == "get" else api.resolve("c1", "mono"))
    assert len(fake.requests) == 1


# --- retries --------------------------------------------------------------------------------


@pytest.mark.parametrize("use", ["get", "resolve"])
async def test_429_retry_after_is_honoured(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi, use: str
) -> None:
    fake.script(
        status(429, headers={"Retry-After": "3"}),
        status(429, headers={"Retry-After": "2"}),
        body({"id": "c1"}) if use == "get" else status(302, headers={"Location": SIGNED}),
    )
    started = trio.current_time()
    await (api.get_call("c1") if use == "get" else api.resolve("c1", "mono"))
    assert trio.current_time() - started == pytest.approx(5.0)
    assert len(fake.requests) == 3


async def test_429_retry_after_http_date(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=6), usegmt=True)
    fake.script(status(429, headers={"Retry-After": when}), body([]))
    started = trio.current_time()
    await api.list_calls()
    assert 4.9 <= trio.current_time() - started <= 6.0


async def test_429_retry_after_is_capped(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    fake.script(status(429, headers={"Retry-After": "3600"}), body([]))
    started = trio.current_time()
    await api.list_calls()
    assert trio.current_time() - started == pytest.approx(POLICY.max_retry_after)


async def test_429_without_retry_after_backs_off_with_bounded_jitter(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    fake.script(*[status(429)] * 4, body([]))
    started = trio.current_time()
    await api.list_calls()
    elapsed = trio.current_time() - started
    # Full jitter: each wait is in [0, base * 2**n]: at most 0.2 + 0.4 + 0.8 + 1.6.
    assert 0 < elapsed <= 3.0 + 1e-9
    assert len(fake.requests) == 5


async def test_backoff_grows_exponentially_up_to_max_delay(
    autojump_clock: trio.abc.Clock, fake: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []
    real_sleep = trio.sleep

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(seconds)

    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    monkeypatch.setattr(trio, "sleep", sleep)
    fake.script(status(503))
    policy = RetryPolicy(attempts=7, base_delay=0.5, max_delay=3.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        api = VapiClient(client, API, KEY, policy=policy)
        with pytest.raises(NetworkError):
            await api.list_calls()
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert len(fake.requests) == 7


@pytest.mark.parametrize("code", [500, 502, 503, 504, 408])
async def test_server_error_burst_then_success(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi, code: int
) -> None:
    fake.script(*[status(code)] * 3, body({"id": "c1"}))
    assert await api.get_call("c1") == {"id": "c1"}
    assert len(fake.requests) == 4
    assert api.attempts["get"] == 4
    assert api.failures == 3


@pytest.mark.parametrize("use", ["list", "get", "resolve"])
async def test_persistent_server_error_gives_up_after_the_policy_attempts(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi, use: str
) -> None:
    fake.script(status(500, json={"message": "Internal server error"}))
    with pytest.raises(NetworkError, match=r"gave up after 5 tries \(HTTP 500\)"):
        if use == "list":
            await api.list_calls()
        elif use == "get":
            await api.get_call("c1")
        else:
            await api.resolve("c1", "mono")
    assert len(fake.requests) == POLICY.attempts


async def test_attempts_follow_the_policy(autojump_clock: trio.abc.Clock, fake: FakeApi) -> None:
    fake.script(status(502))
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        api = VapiClient(client, API, KEY, policy=RetryPolicy(attempts=2))
        with pytest.raises(NetworkError, match="gave up after 2 tries"):
            await api.resolve("c1", "mono")
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    "exc", [httpx.ConnectError, httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError]
)
async def test_transport_errors_are_retried(
    autojump_clock: trio.abc.Clock,
    api: VapiClient,
    fake: FakeApi,
    exc: type[httpx.TransportError],
) -> None:
    fake.script(raises(exc), raises(exc), body({"id": "c1"}))
    assert await api.get_call("c1") == {"id": "c1"}
    assert len(fake.requests) == 3
    assert not api.unreachable


async def test_transport_errors_on_resolve_are_retried(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    fake.script(raises(httpx.ReadError), status(503), status(302, headers={"Location": SIGNED}))
    assert (await api.resolve("c1", "mono")).url == SIGNED
    assert len(fake.requests) == 3
    assert api.attempts["resolve"] == 3


async def test_persistent_read_errors_give_up_after_the_policy_attempts(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    fake.script(raises(httpx.ReadError))
    with pytest.raises(NetworkError, match=r"5 tries \(ReadError\)"):
        await api.get_call("c1")
    assert len(fake.requests) == 5


async def test_malformed_json_is_retried(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    fake.script(status(200, content=b'[{"id": "a"'), status(200, content=b"\xff\xfe"), body([]))
    assert await api.list_calls() == []
    assert len(fake.requests) == 3


async def test_persistent_malformed_json_is_a_protocol_error(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    fake.script(status(200, content=b"<html>maintenance</html>"))
    with pytest.raises(ProtocolError, match="malformed JSON"):
        await api.get_call("c1")
    assert len(fake.requests) == POLICY.attempts


# --- secrets stay out of errors -------------------------------------------------------------


async def test_errors_never_carry_the_key_or_a_query_string(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    echo = f"bad key {KEY}, see {SIGNED}"
    fake.script(status(401, json={"message": echo}))
    with pytest.raises(KeyRejected) as rejected:
        await api.resolve("c1", "mono")
    fake.script(status(400, json={"message": [echo, "again " + SIGNED]}))
    with pytest.raises(ProtocolError) as protocol:
        await api.get_call("c1")
    fake.script(status(503))
    with pytest.raises(NetworkError) as network:
        await api.list_calls(createdAtLe="2025-01-01T00:00:00Z", limit="1000")
    fake.script(raises(httpx.ReadError))
    with pytest.raises(NetworkError) as transport:
        await api.resolve("c1", "mono")
    for exc in (rejected.value, protocol.value, network.value, transport.value):
        for text in (str(exc), describe(exc)):
            assert KEY not in text
            assert "deadbeefcafe" not in text
            assert "X-Amz-Expires=" not in text
            assert "createdAtLe" not in text
    assert "storage.test/rec.wav" in str(rejected.value)


def test_describe_http_error_drops_the_query() -> None:
    request = httpx.Request("GET", SIGNED)
    text = describe(httpx.ReadTimeout("timed out", request=request))
    assert text == "ReadTimeout on https://storage.test/rec.wav?<redacted>"


def test_describe_other_exception_redacts_the_key() -> None:
    REDACTOR.add_secret(KEY)
    assert describe(ValueError(f"oops {KEY}")) == "ValueError: oops <redacted>"


# --- retry policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5", 5.0), (" 7 ", 7.0), ("0", 0.0), ("1.5", 1.5), ("-3", 0.0)],
)
def test_parse_retry_after_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


def test_parse_retry_after_http_date() -> None:
    future = datetime.now(UTC) + timedelta(seconds=120)
    parsed = parse_retry_after(email.utils.format_datetime(future, usegmt=True))
    assert parsed is not None
    assert 118.0 <= parsed <= 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


@pytest.mark.parametrize(
    "value", [None, "", "   ", "soon", "Mon,", "Wed, 32 Foo 2015 07:28:00 GMT", "1 2 3"]
)
def test_parse_retry_after_junk(value: str | None) -> None:
    assert parse_retry_after(value) is None


def test_delay_honours_retry_after_within_bounds() -> None:
    policy = RetryPolicy(max_retry_after=10.0)
    assert policy.delay(0, 3.0) == 3.0
    assert policy.delay(4, 0.0) == 0.0
    assert policy.delay(0, 60.0) == 10.0
    assert policy.delay(0, -5.0) == 0.0


def test_delay_jitter_is_bounded() -> None:
    policy = RetryPolicy(base_delay=0.25, max_delay=2.0)
    for attempt in range(12):
        bound = min(2.0, 0.25 * 2**attempt)
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= bound for d in delays)
        # Jittered: not one fixed value.
        assert len(set(delays)) > 1


def test_delay_bound_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    policy = RetryPolicy(base_delay=0.2, max_delay=4.0)
    assert [policy.delay(n) for n in range(7)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 4, 4])


# --- redaction ------------------------------------------------------------------------------


def test_redactor_removes_query_strings() -> None:
    redact = Redactor()
    text = f"GET {SIGNED} failed; also 'http://x.test/a?b=c' and https://y.test/plain"
    assert redact(text) == (
        "GET https://storage.test/rec.wav?<redacted> failed; "
        "also 'http://x.test/a?<redacted>' and https://y.test/plain"
    )


def test_redactor_removes_signing_parameters_outside_urls() -> None:
    redact = Redactor()
    text = (
        "params X-Amz-Signature=abc123&X-Amz-Credential=AKIA/2025/auto/s3/aws4_request "
        "x-amz-security-token=tok Signature=zz Expires=1700000000 token=t0k"
    )
    out = redact(text)
    for secret in ("abc123", "AKIA", "tok ", "zz", "1700000000", "t0k"):
        assert secret not in out
    assert out.startswith("params X-Amz-Signature=<redacted>&X-Amz-Credential=<redacted>")


def test_redactor_removes_registered_secrets() -> None:
    redact = Redactor()
    redact.add_secret("")  # ignored, or it would match everywhere
    redact.add_secret("sk-short")
    redact.add_secret("sk-short-and-longer")
    redact.add_secret("sk-short")
    assert redact("key sk-short-and-longer and sk-short!") == "key <redacted> and <redacted>!"
    assert redact("nothing to hide") == "nothing to hide"


def test_redact_url() -> None:
    assert redact_url(SIGNED) == "https://storage.test/rec.wav?<redacted>"
    assert redact_url("https://storage.test/rec.wav") == "https://storage.test/rec.wav"


def make_record(msg: str, args: tuple[object, ...], exc: BaseException | None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("vapifs.test", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_redacting_filter_scrubs_message_args_and_exception() -> None:
    secret = "sk-filter-test-93be11"
    REDACTOR.add_secret(secret)
    try:
        raise httpx.ReadError(f"reading {SIGNED} with {secret}")
    except httpx.ReadError as exc:
        record = make_record("fetch %s failed for %s", (SIGNED, secret), exc)
    assert RedactingFilter().filter(record)
    text = logging.Formatter("%(message)s").format(record)
    assert secret not in text
    assert "deadbeefcafe" not in text
    assert text.startswith(
        "fetch https://storage.test/rec.wav?<redacted> failed for <redacted>\nTraceback"
    )
    assert "httpx.ReadError: reading https://storage.test/rec.wav?<redacted> with <redacted>" in (
        text
    )
    assert record.exc_info is None
    assert record.args is None


def test_redacting_filter_in_a_logger(caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-filter-test-77aa02"
    REDACTOR.add_secret(secret)
    logger = logging.getLogger("vapifs.test.redact")
    logger.addFilter(RedactingFilter())
    try:
        with caplog.at_level(logging.INFO, logger="vapifs.test.redact"):
            logger.info("secret=%s url=%s", secret, SIGNED)
    finally:
        logger.filters.clear()
    (message,) = caplog.messages
    assert message == "secret=<redacted> url=https://storage.test/rec.wav?<redacted>"


def test_redacting_filter_survives_a_bad_format_string() -> None:
    record = make_record("only %s here %s", ("one",), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "only %s here %s ('one',)"


def test_describe_http_error_without_a_request() -> None:
    assert describe(httpx.ReadError("cut")) == "ReadError"
