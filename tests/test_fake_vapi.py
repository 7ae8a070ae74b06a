"""Tests for the fake Vapi: synthetic data, API, signed storage, fault knobs and CLI."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import wave
from array import array
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from vapifs.demo.data import KINDS, FakeCall, extra_call, generate_calls
from vapifs.demo.server import FakeVapi

NOW = datetime(2026, 11, 20, 12, 0, 0, tzinfo=UTC)
SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(scope="module")
def calls() -> list[FakeCall]:
    return generate_calls(NOW, seed=0)


@pytest.fixture
def fake(calls: list[FakeCall]) -> Iterator[FakeVapi]:
    # Fresh copies of the mutable parts so swaps in one test do not leak into others.
    copies = [
        FakeCall(call=fc.call, artifacts=dict(fc.artifacts), suffixes=dict(fc.suffixes))
        for fc in calls
    ]
    with FakeVapi(copies, secret=b"test-secret") as fv:
        yield fv


@pytest.fixture
def api(fake: FakeVapi) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {fake.api_key}"}
    with httpx.Client(base_url=fake.api_url, headers=headers, timeout=10) as client:
        yield client


def _with(calls: list[FakeCall], kind: str, suffix: str = ".wav") -> FakeCall:
    return next(fc for fc in calls if fc.suffixes.get(kind) == suffix)


def _resolve(api: httpx.Client, call_id: str, endpoint: str) -> str:
    r = api.get(f"/call/{call_id}/{endpoint}")
    assert r.status_code == 302, r.text
    return r.headers["location"]


# ---------------------------------------------------------------- data


def test_generation_is_deterministic_and_complete(calls: list[FakeCall]) -> None:
    again = generate_calls(NOW, seed=0)
    assert [fc.call for fc in again] == [fc.call for fc in calls]
    assert [fc.artifacts for fc in again] == [fc.artifacts for fc in calls]
    other = generate_calls(NOW, seed=1)
    assert {fc.id for fc in other}.isdisjoint({fc.id for fc in calls})

    assert len(calls) >= 12
    ages = [(NOW - datetime.fromisoformat(fc.created_at)).total_seconds() / 86400 for fc in calls]
    assert sum(1 for a in ages if a <= 10) >= 12
    assert sum(1 for a in ages if 19 < a < 21) == 1
    created = [fc.created_at for fc in calls]
    assert len(created) - len(set(created)) == 1  # exactly one shared createdAt pair
    assert all(c.endswith("Z") and len(c) == 24 for c in created)
    types = {fc.call["type"] for fc in calls}
    assert {"inboundPhoneCall", "outboundPhoneCall", "webCall"} <= types
    assert len({fc.call["assistantId"] for fc in calls}) == 3
    assert sum(1 for fc in calls if fc.call["status"] == "in-progress") == 1
    assert any(not fc.artifacts for fc in calls)
    assert any("stereo" not in fc.artifacts and "logs" in fc.artifacts for fc in calls)
    assert any(fc.suffixes.get("stereo") == ".mp3" for fc in calls)
    assert any("video" in fc.artifacts and fc.call["type"] == "webCall" for fc in calls)
    for fc in calls:
        art = fc.call["artifact"]
        assert ("recordingUrl" in art) == ("mono" in fc.artifacts)
        assert ("pcapUrl" in art) == ("pcap" in fc.artifacts)
        assert set(fc.artifacts) <= set(KINDS)
        if "stereo" in fc.artifacts:
            url = art["recording"]["stereoUrl"]
            assert url.startswith(f"https://storage.vapi.example/{fc.call['orgId']}/{fc.id}-")
            assert url.endswith("-stereo" + fc.suffixes["stereo"])
        if fc.call["type"] != "webCall":
            assert "phoneNumberId" in fc.call


def test_wav_channels_are_consistent(calls: list[FakeCall]) -> None:
    fc = _with(calls, "stereo")

    def frames(kind: str) -> tuple[int, int, array[int]]:
        with wave.open(io.BytesIO(fc.artifacts[kind]), "rb") as w:
            assert w.getsampwidth() == 2
            samples = array("h", w.readframes(w.getnframes()))
            return w.getnchannels(), w.getframerate(), samples

    ch, rate, stereo = frames("stereo")
    assert ch == 2 and rate in (8000, 16000)
    left, right = stereo[0::2], stereo[1::2]
    assert len(left) >= 3 * rate
    assert left != right
    _, _, customer = frames("customer")
    _, _, assistant = frames("assistant")
    _, _, mono = frames("mono")
    assert customer == left and assistant == right
    for i in range(0, len(left), 97):
        assert mono[i] == (left[i] + right[i]) // 2
    assert any(left) and any(right)


def test_mp3_logs_pcap_video(calls: list[FakeCall]) -> None:
    mp3 = _with(calls, "stereo", ".mp3").artifacts["stereo"]
    assert mp3[:4] == b"\xff\xfb\x94\x04" and mp3[384:388] == b"\xff\xfb\x94\x04"
    assert len(mp3) % 384 == 0

    with_errors = 0
    for fc in calls:
        if "logs" not in fc.artifacts:
            continue
        lines = gzip.decompress(fc.artifacts["logs"]).decode().splitlines()
        assert 200 <= len(lines) <= 600
        records = [json.loads(line) for line in lines]
        assert all({"time", "level", "message", "attributes"} <= set(r) for r in records)
        with_errors += any(r["level"] == "ERROR" for r in records)
    assert with_errors >= len(calls) // 2

    pcap = _with(calls, "pcap", ".pcap").artifacts["pcap"]
    magic, major, minor, _, _, _, link = struct.unpack_from("<IHHiIII", pcap)
    assert (magic, major, minor, link) == (0xA1B2C3D4, 2, 4, 1)
    offset, packets = 24, []
    while offset < len(pcap):
        _, _, incl, orig = struct.unpack_from("<IIII", pcap, offset)
        frame = pcap[offset + 16 : offset + 16 + incl]
        assert incl == orig == len(frame)
        assert struct.unpack_from(">H", frame, 16)[0] == len(frame) - 14  # IPv4 total length
        assert struct.unpack_from(">H", frame, 38)[0] == len(frame) - 34  # UDP length
        packets.append(frame[42:])
        offset += 16 + incl
    assert packets[0].startswith(b"INVITE ") and any(p.startswith(b"BYE ") for p in packets)

    video = _with(calls, "video", ".mp4").artifacts["video"]
    assert video[4:8] == b"ftyp" and b"moov" in video[:200] and b"mvhd" in video[:200]


def test_big_stereo_is_fast() -> None:
    start = time.monotonic()
    big = generate_calls(NOW, seed=3, count=12, big_stereo_mb=200)
    elapsed = time.monotonic() - start
    assert elapsed < 3.0
    data = big[0].artifacts["stereo"]
    assert abs(len(data) - 200 * 1024 * 1024) < 1024 * 1024
    with wave.open(io.BytesIO(data[:44] + data[44 : 44 + 4 * 16000]), "rb") as w:
        assert w.getnchannels() == 2
    assert struct.unpack_from("<I", data, 40)[0] == len(data) - 44
    assert max(fc.created_at for fc in big) == big[0].created_at
    ended = datetime.fromisoformat(big[0].call["endedAt"])
    assert ended.timestamp() <= time.time()


# ---------------------------------------------------------------- API


def test_listing_newest_first_and_paging(fake: FakeVapi, api: httpx.Client) -> None:
    everything = api.get("/call", params={"limit": 1000}).json()
    assert len(everything) == len(fake.calls)
    stamps = [c["createdAt"] for c in everything]
    assert stamps == sorted(stamps, reverse=True)
    assert len(api.get("/call", params={"limit": 3}).json()) == 3
    assert len(api.get("/call").json()) == len(fake.calls)  # default limit 100

    # Page backwards by createdAtLe, dropping ids already seen.
    seen: dict[str, dict[str, Any]] = {}
    params: dict[str, Any] = {"limit": 4}
    for _ in range(20):
        page = api.get("/call", params=params).json()
        new = [c for c in page if c["id"] not in seen]
        if not new:
            break
        seen.update((c["id"], c) for c in new)
        params["createdAtLe"] = page[-1]["createdAt"]
    assert set(seen) == set(fake.calls)

    some = everything[4]
    by_assistant = api.get("/call", params={"assistantId": some["assistantId"]}).json()
    assert by_assistant and all(c["assistantId"] == some["assistantId"] for c in by_assistant)
    assert [c["id"] for c in api.get("/call", params={"id": some["id"]}).json()] == [some["id"]]
    gt = api.get("/call", params={"createdAtGt": some["createdAt"]}).json()
    assert all(c["createdAt"] > some["createdAt"] for c in gt)

    bad = api.get("/call", params={"limit": 1001})
    assert bad.status_code == 400
    assert bad.json()["message"] == ["limit must not be greater than 1000"]


def test_auth_and_not_found(fake: FakeVapi, api: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = httpx.get(f"{fake.api_url}/call", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"] == "Unauthorized" and "Invalid Key" in r.json()["message"]
    r = api.get("/call/00000000-0000-4000-8000-000000000000")
    assert r.status_code == 404 and r.json()["message"] == "Call not found"
    no_rec = next(fc for fc in fake.calls.values() if "stereo" not in fc.artifacts)
    r = api.get(f"/call/{no_rec.id}/stereo-recording")
    assert r.status_code == 404 and r.json()["statusCode"] == 404
    c = fake.counters()
    assert c["api.unauthorized"] == 2 and c["api.requests"] == 4 and c["api.get"] == 1


def test_presigned_fields(fake: FakeVapi, api: httpx.Client) -> None:
    fc = _with(list(fake.calls.values()), "stereo")
    call = api.get(f"/call/{fc.id}").json()
    art = call["artifact"]
    assert art["presignedStereoUrl"].startswith(fake.storage_url)
    assert art["presignedUrlsExpiresAt"].endswith("Z")
    assert "presignedVideoUrl" not in art or "video" in fc.artifacts
    assert "presignedStereoUrl" not in fc.call["artifact"]  # stored object stays clean
    r = httpx.get(art["presignedLogUrl"])
    assert r.status_code == 200 and r.content == fc.artifacts["logs"]


def test_redirect_then_ranged_get(fake: FakeVapi, api: httpx.Client) -> None:
    fc = _with(list(fake.calls.values()), "stereo")
    data = fc.artifacts["stereo"]
    r = api.get(f"/call/{fc.id}/stereo-recording")
    assert r.status_code == 302 and "url" in r.json()
    url = r.headers["location"]
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
    with httpx.Client(timeout=10) as storage:
        r = storage.get(url, headers={"Range": "bytes=100-1099"})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes 100-1099/{len(data)}"
        assert r.content == data[100:1100]
        assert r.headers["accept-ranges"] == "bytes"
        assert r.headers["content-type"] == "audio/wav"
        assert "content-encoding" not in r.headers
        r = storage.get(url, headers={"Range": "bytes=-10"})
        assert r.content == data[-10:]
        assert r.headers["content-range"] == f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"
        r = storage.get(url, headers={"Range": f"bytes={len(data) - 5}-"})
        assert r.status_code == 206 and r.content == data[-5:]
        r = storage.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
        r = storage.get(url)
        assert r.status_code == 200 and r.content == data
        etag = r.headers["etag"]
        assert etag.startswith('"') and r.headers["last-modified"].endswith("GMT")
        head = storage.head(url)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
        assert storage.get(url.replace(fc.id, "f" * 8)).status_code == 403
    c = fake.counters()
    assert c[f"storage.get:{fc.id}/stereo"] == 5
    assert c["storage.bytes"] == 1000 + 10 + 5 + len(data)
    assert c["api.resolve"] == 1 and c["storage.requests"] == 7


def test_expired_and_tampered_urls(fake: FakeVapi, api: httpx.Client) -> None:
    fc = _with(list(fake.calls.values()), "stereo")
    url = _resolve(api, fc.id, "mono-recording")
    tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    r = httpx.get(tampered)
    assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    query["X-Fake-Expires-At"] = str(int(query["X-Fake-Expires-At"]) + 10_000)
    assert httpx.get(parts._replace(query=urlencode(query)).geturl()).status_code == 403
    assert httpx.get(url.split("?")[0]).status_code == 403

    fake.set_knobs(url_ttl=1)
    short = _resolve(api, fc.id, "mono-recording")
    assert "X-Amz-Expires=1&" in short
    assert httpx.get(short).status_code == 200
    time.sleep(2.1)
    r = httpx.get(short)
    assert r.status_code == 403
    assert r.text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    assert "<Code>AccessDenied</Code><Message>Request has expired</Message>" in r.text
    c = fake.counters()
    assert c["storage.expired"] == 1 and c["storage.bad_signature"] == 3


def test_knobs_ignore_range_cut_and_artifact_200(fake: FakeVapi, api: httpx.Client) -> None:
    fc = _with(list(fake.calls.values()), "stereo")
    data = fc.artifacts["stereo"]
    url = _resolve(api, fc.id, "stereo-recording")

    fake.set_knobs(ignore_range=True)
    r = httpx.get(url, headers={"Range": "bytes=0-9"})
    assert r.status_code == 200 and r.content == data
    fake.set_knobs(ignore_range=False, wrong_content_range=True)
    r = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.headers["content-range"] != f"bytes 10-19/{len(data)}"
    fake.set_knobs(wrong_content_range=False, gzip_ranged=True)
    r = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert r.headers["content-encoding"] == "gzip" and r.content == data[10:20]
    fake.set_knobs(gzip_ranged=False)

    fake.set_knobs(cut_rate=1.0)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url)
    with httpx.stream("GET", url) as resp:
        got = b""
        with pytest.raises(httpx.HTTPError):
            for piece in resp.iter_raw():
                got += piece
        assert int(resp.headers["content-length"]) == len(data) > len(got)
    fake.set_knobs(cut_rate=0.0)

    fake.set_knobs(artifact_200=True)
    r = api.get(f"/call/{fc.id}/stereo-recording")
    assert r.status_code == 200 and r.content == data
    r = api.get(f"/call/{fc.id}/stereo-recording", headers={"Range": "bytes=5-14"})
    assert r.status_code == 206 and r.content == data[5:15]

    fake.set_knobs(artifact_200=False, api_429_rate=1.0, retry_after=2)
    r = api.get("/call")
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    fake.set_knobs(api_429_rate=0.0, api_500_rate=1.0)
    assert api.get("/call").status_code == 500
    fake.set_knobs(api_500_rate=0.0, malformed_json_rate=1.0)
    with pytest.raises(json.JSONDecodeError):
        api.get("/call").json()
    fake.set_knobs(malformed_json_rate=0.0, odd_calls=True)
    listing = api.get("/call", params={"limit": 1000}).json()
    assert len(listing) > len(fake.calls) and None in [
        c.get("id") for c in listing if isinstance(c, dict)
    ]
    fake.set_knobs(odd_calls=False, api_down=True)
    with pytest.raises(httpx.HTTPError):
        api.get("/call")
    fake.set_knobs(api_down=False, storage_down=True)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url)
    fake.set_knobs(storage_down=False, stall_rate=1.0, stall_seconds=5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=httpx.Timeout(5, read=0.3))


def test_swap_add_call_and_admin(fake: FakeVapi, api: httpx.Client) -> None:
    fc = _with(list(fake.calls.values()), "stereo")
    url = _resolve(api, fc.id, "customer-recording")
    before = httpx.get(url)
    admin = httpx.Client(base_url=fake.api_url)
    r = admin.post("/_fake/swap", json={"call_id": fc.id, "kind": "customer", "seed": 7})
    assert r.status_code == 200
    after = httpx.get(url)
    assert after.headers["etag"] != before.headers["etag"]
    assert after.headers["last-modified"] != before.headers["last-modified"]
    assert len(after.content) != len(before.content)
    assert after.content == fake.calls[fc.id].artifacts["customer"]

    r = admin.post("/_fake/add-call", json={"seed": 5, "created_at": "2030-01-01T00:00:00Z"})
    new_id = r.json()["id"]
    assert api.get("/call", params={"limit": 1}).json()[0]["id"] == new_id
    assert api.get(f"/call/{new_id}/call-logs").status_code == 302
    assert extra_call(5, datetime(2030, 1, 1, tzinfo=UTC)).id == new_id

    r = admin.post("/_fake/knobs", json={"url_ttl": 30})
    assert r.json()["url_ttl"] == 30 and fake.knobs.url_ttl == 30
    assert admin.post("/_fake/knobs", json={"nope": 1}).status_code == 400
    counters = admin.get("/_fake/counters").json()
    assert counters["api.requests"] == 3 and counters == fake.counters()
    assert admin.post("/_fake/reset-counters").status_code == 200
    assert fake.counters()["api.requests"] == 0 and fake.counters()["storage.bytes"] == 0
    admin.close()


def test_pause_and_resume_same_ports(fake: FakeVapi, api: httpx.Client) -> None:
    port = fake.api_url
    assert api.get("/call", params={"limit": 1}).status_code == 200
    fake.pause()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{fake.api_url}/call", timeout=2)
    fake.resume()
    assert fake.api_url == port
    assert api.get("/call", params={"limit": 1}).status_code == 200


def test_main_subprocess() -> None:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vapifs.demo", "--count", "12", "--url-ttl", "5", "--api-key", "k"],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["api_key"] == "k" and info["pid"] == proc.pid
        r = httpx.get(f"{info['api_url']}/call", headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and len(r.json()) == 13
        assert info["storage_url"].startswith("http://127.0.0.1:")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
