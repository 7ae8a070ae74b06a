"""Deterministic synthetic Vapi calls with real recordings, logs and packet captures."""

from __future__ import annotations

import gzip
import json
import math
import random
import struct
import sys
import uuid
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

KINDS = ("mono", "stereo", "customer", "assistant", "video", "logs", "pcap")
AUDIO_KINDS = ("mono", "stereo", "customer", "assistant")

# Path segment of GET /call/{id}/<endpoint> for each artifact kind.
ENDPOINTS: dict[str, str] = {
    "mono": "mono-recording",
    "stereo": "stereo-recording",
    "customer": "customer-recording",
    "assistant": "assistant-recording",
    "video": "video-recording",
    "logs": "call-logs",
    "pcap": "pcap",
}
KIND_BY_ENDPOINT: dict[str, str] = {v: k for k, v in ENDPOINTS.items()}

# Name of the artifact.presigned*Url field the API fills in for each kind.
PRESIGNED_FIELDS: dict[str, str] = {
    "mono": "presignedMonoUrl",
    "stereo": "presignedStereoUrl",
    "customer": "presignedCustomerUrl",
    "assistant": "presignedAssistantUrl",
    "video": "presignedVideoUrl",
    "logs": "presignedLogUrl",
    "pcap": "presignedPcapUrl",
}

CONTENT_TYPES: dict[str, str] = {
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".mp4": "video/mp4",
    ".jsonl.gz": "application/gzip",
    ".pcap": "application/vnd.tcpdump.pcap",
}

STABLE_HOST = "https://storage.vapi.example"

_DAY_MS = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Audio is assembled from "syllables" of this length, so only a handful of distinct
# sample blocks are ever computed per call and minutes of audio are built by joining bytes.
_UNIT_SECONDS = 0.2
_CALL_TYPES = ("inboundPhoneCall", "webCall", "outboundPhoneCall")


@dataclass
class FakeCall:
    """One call: its Call object (without presigned fields) and its artifact bytes."""

    call: dict[str, Any]
    artifacts: dict[str, bytes]
    suffixes: dict[str, str]

    @property
    def id(self) -> str:
        return str(self.call["id"])

    @property
    def created_at(self) -> str:
        return str(self.call["createdAt"])


# ---------------------------------------------------------------- small helpers


def iso_ms(ms: int) -> str:
    """Format epoch milliseconds the way Vapi does: 2026-11-20T10:15:30.123Z."""
    dt = _EPOCH + timedelta(milliseconds=ms)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def epoch_ms(dt: datetime) -> int:
    """Epoch milliseconds of an aware (or naive UTC) datetime."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _rng(*parts: object) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random, so they are stable across runs.
    return random.Random("vapifs-demo:" + ":".join(str(p) for p in parts))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def org_id_for(seed: int) -> str:
    """The organisation id used for every call generated with this seed."""
    return _uuid(_rng("org", seed))


def assistant_ids_for(seed: int) -> list[str]:
    """The three assistant ids used with this seed."""
    rng = _rng("assistants", seed)
    return [_uuid(rng) for _ in range(3)]


def phone_number_ids_for(seed: int) -> list[str]:
    """The two phone number ids used with this seed."""
    rng = _rng("phone-numbers", seed)
    return [_uuid(rng) for _ in range(2)]


def _le(samples: array[int]) -> bytes:
    # WAV data is little-endian whatever the host is.
    if sys.byteorder == "big":
        samples = array("h", samples)
        samples.byteswap()
    return samples.tobytes()


def wav_bytes(pcm: bytes, *, channels: int, rate: int) -> bytes:
    """A canonical 44-byte-header 16-bit PCM WAV file around pcm."""
    # Written by hand rather than with the wave module so that a multi-hundred-MB body is
    # not copied through a BytesIO more than once.
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(pcm),
        b"WAVE",
        b"fmt ",
        16,
        1,
        channels,
        rate,
        rate * channels * 2,
        channels * 2,
        16,
        b"data",
        len(pcm),
    )
    return header + pcm


# ---------------------------------------------------------------- audio


def _voice_unit(rate: int, freq: float, amp: float, shape: int) -> array[int]:
    n = int(rate * _UNIT_SECONDS)
    w = 2.0 * math.pi * freq / rate
    out = array("h", bytes(2 * n))
    for i in range(n):
        # A sine envelope makes each block start and end at zero: clicks-free joins.
        env = math.sin(math.pi * i / n) ** shape
        v = math.sin(w * i) + 0.35 * math.sin(2 * w * i) + 0.15 * math.sin(3 * w * i)
        out[i] = int(amp * env * v)
    return out


def _plan(
    rng: random.Random, n_units: int
) -> tuple[list[tuple[int, int]], list[tuple[str, int, int]]]:
    """Timeline of (customer voice, assistant voice) per unit (-1 = silent) and the turns."""
    units: list[tuple[int, int]] = [(-1, -1)] * rng.randint(1, 3)
    turns: list[tuple[str, int, int]] = []
    speaker = "assistant"
    while len(units) < n_units:
        length = rng.randint(4, 22)
        start = len(units)
        # Sometimes the listener says "mm-hm" over the speaker: both channels carry sound.
        backchannel = rng.randint(1, length - 3) if rng.random() < 0.35 else -1
        for k in range(length):
            voice = rng.randrange(3) if rng.random() > 0.12 else -1
            other = (
                rng.randrange(3) if backchannel >= 0 and backchannel <= k < backchannel + 2 else -1
            )
            units.append((voice, other) if speaker == "customer" else (other, voice))
        turns.append((speaker, start, len(units)))
        units.extend([(-1, -1)] * rng.randint(1, 5))
        speaker = "customer" if speaker == "assistant" else "assistant"
    return units, turns


def _render(
    rng: random.Random, rate: int, units: list[tuple[int, int]], n_samples: int
) -> dict[str, bytes]:
    """PCM (no header) for stereo (L=customer, R=assistant), mono, customer, assistant."""
    un = int(rate * _UNIT_SECONDS)
    c_base = rng.uniform(140.0, 230.0)
    a_base = rng.uniform(260.0, 430.0)
    c_voices = [
        _voice_unit(rate, c_base * m, rng.uniform(6000, 12000), rng.choice((1, 2, 3)))
        for m in (1.0, 1.17, 0.86)
    ]
    a_voices = [
        _voice_unit(rate, a_base * m, rng.uniform(6000, 12000), rng.choice((1, 2, 3)))
        for m in (1.0, 1.12, 0.9)
    ]
    silence = array("h", bytes(2 * un))
    cache: dict[tuple[int, int], tuple[bytes, bytes, bytes, bytes]] = {}
    parts: tuple[list[bytes], list[bytes], list[bytes], list[bytes]] = ([], [], [], [])
    for key in units:
        blocks = cache.get(key)
        if blocks is None:
            left = c_voices[key[0]] if key[0] >= 0 else silence
            right = a_voices[key[1]] if key[1] >= 0 else silence
            st = array("h", bytes(4 * un))
            st[0::2] = left
            st[1::2] = right
            # >> 1 is floor division by two, i.e. exactly (L + R) // 2.
            mono = array("h", [(a + b) >> 1 for a, b in zip(left, right, strict=True)])
            blocks = (_le(st), _le(mono), _le(left), _le(right))
            cache[key] = blocks
        for lst, blk in zip(parts, blocks, strict=True):
            lst.append(blk)
    stereo, mono_b, left_b, right_b = (b"".join(p) for p in parts)
    return {
        "stereo": stereo[: 4 * n_samples],
        "mono": mono_b[: 2 * n_samples],
        "customer": left_b[: 2 * n_samples],
        "assistant": right_b[: 2 * n_samples],
    }


def _wav_set(
    rng: random.Random, rate: int, units: list[tuple[int, int]], n_samples: int
) -> dict[str, bytes]:
    pcm = _render(rng, rate, units, n_samples)
    return {k: wav_bytes(v, channels=2 if k == "stereo" else 1, rate=rate) for k, v in pcm.items()}


def big_stereo_wav(rng: random.Random, megabytes: int, rate: int = 16000) -> tuple[bytes, int]:
    """A valid stereo WAV of about megabytes MiB, made of one repeated second; and its seconds."""
    un = int(rate * _UNIT_SECONDS)
    units, _ = _plan(rng, rate // un)
    # Guarantee both channels carry sound in the repeated second.
    units = [(0, -1), (1, -1), (-1, -1), (-1, 0), (-1, 2), *units][: rate // un]
    chunk = _render(rng, rate, units, rate)["stereo"]
    reps = max(1, (megabytes * 1024 * 1024) // len(chunk))
    return wav_bytes(chunk * reps, channels=2, rate=rate), reps


# ---------------------------------------------------------------- other formats


def mp3_bytes(n_frames: int, *, channels: int, tag: bytes) -> bytes:
    """MPEG-1 Layer III, 128 kbit/s, 48 kHz frames that decode as silence."""
    # 0xFFFB: sync, MPEG-1, Layer III, no CRC. 0x94: 128 kbit/s, 48 kHz, no padding.
    # At 48 kHz a frame is exactly 144 * 128000 / 48000 = 384 bytes, so padding is never needed.
    header = bytes((0xFF, 0xFB, 0x94, 0x04 if channels == 2 else 0xC4))
    side = 32 if channels == 2 else 17
    frame_len = 144 * 128000 // 48000
    # Zeroed side info (part2_3_length 0, global_gain 0) means no spectral data: silence;
    # the rest of the frame is ancillary data, which decoders skip, so it can carry a tag.
    body = tag[: frame_len - 4 - side].ljust(frame_len - 4 - side, b"\0")
    return (header + bytes(side) + body) * max(1, n_frames)


def mp3_frames_for(seconds: float) -> int:
    return math.ceil(seconds * 48000 / 1152)


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def mp4_bytes(rng: random.Random, seconds: float, created_ms: int) -> bytes:
    """A minimal ISO-BMFF file: ftyp, moov/mvhd and an mdat of opaque bytes."""
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 0x200) + b"isomiso2mp41")
    mac_time = created_ms // 1000 + 2_082_844_800  # seconds since 1904-01-01
    matrix = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    mvhd = _box(
        b"mvhd",
        struct.pack(">I4I", 0, mac_time, mac_time, 1000, int(seconds * 1000))
        + struct.pack(">IH10x", 0x00010000, 0x0100)
        + matrix
        + bytes(24)
        + struct.pack(">I", 2),
    )
    mdat = _box(b"mdat", rng.randbytes(int(seconds * 12_000) + rng.randint(0, 4096)))
    return ftyp + _box(b"moov", mvhd) + mdat


_LOG_INFO = (
    "Call started",
    "Assistant speech started",
    "Assistant speech ended",
    "Customer speech detected",
    "Transcriber final result",
    "Model response received",
    "Voice synthesis completed",
    "Endpointing triggered",
    "Webhook delivered",
)
_LOG_DEBUG = (
    "Audio frame batch processed",
    "VAD state changed",
    "Token stream chunk",
    "Jitter buffer adjusted",
    "Heartbeat",
)
_LOG_WARN = (
    "Transcriber latency above threshold",
    "Model response slow",
    "Packet loss detected",
    "Customer interrupted assistant",
)
_LOG_ERROR = (
    "Model request failed: upstream timeout",
    "Voice provider returned 503",
    "Tool call failed: webhook responded 500",
    "Transcriber connection dropped",
    "RTP stream stalled",
)
_COMPONENTS = ("transport", "transcriber", "model", "voice", "endpointing", "webhook")


def logs_bytes(
    rng: random.Random, call_id: str, start_ms: int, end_ms: int, n_errors: int
) -> bytes:
    """Gzipped JSONL call logs with exactly n_errors ERROR lines."""
    n = rng.randint(200, 600)
    span = max(1, end_ms - start_ms)
    times = sorted(start_ms + rng.randrange(span) for _ in range(n))
    errors = set(rng.sample(range(n), min(n_errors, n)))
    lines: list[str] = []
    for i, t in enumerate(times):
        if i in errors:
            level, message = "ERROR", rng.choice(_LOG_ERROR)
        else:
            r = rng.random()
            if r < 0.55:
                level, message = "INFO", rng.choice(_LOG_INFO)
            elif r < 0.93:
                level, message = "DEBUG", rng.choice(_LOG_DEBUG)
            else:
                level, message = "WARN", rng.choice(_LOG_WARN)
        attrs: dict[str, Any] = {
            "callId": call_id,
            "component": rng.choice(_COMPONENTS),
            "seq": i,
        }
        if level != "DEBUG":
            attrs["latencyMs"] = rng.randint(20, 2500)
        obj = {"time": iso_ms(t), "level": level, "message": message, "attributes": attrs}
        lines.append(json.dumps(obj, separators=(",", ":")))
    # mtime=0 keeps the gzip header, and so the bytes, deterministic.
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


def _ip_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f">{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _udp_frame(src: bytes, dst: bytes, payload: bytes, ident: int) -> bytes:
    udp = struct.pack(">HHHH", 5060, 5060, 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident, 0x4000, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack(">H", _ip_checksum(ip)) + ip[12:]
    macs = bytes((0x02, 0, 0, 0, 0, dst[3])) + bytes((0x02, 0, 0, 0, 0, src[3]))
    return macs + b"\x08\x00" + ip + udp


def pcap_bytes(
    rng: random.Random,
    call_id: str,
    start_ms: int,
    end_ms: int,
    customer: str,
    inbound: bool,
    extra_options: int = 0,
) -> bytes:
    """A libpcap capture of the call's SIP dialogue over Ethernet/IPv4/UDP."""
    carrier = bytes((203, 0, 113, rng.randint(2, 250)))
    vapi = bytes((198, 51, 100, rng.randint(2, 250)))
    ours = "+1" + "".join(str(rng.randrange(10)) for _ in range(10))
    caller, callee = (customer, ours) if inbound else (ours, customer)
    a, b = (carrier, vapi) if inbound else (vapi, carrier)
    tag1, tag2, branch = rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(48)
    sip_id = f"{call_id}@vapi"

    def msg(first: str, cseq: str, with_sdp: bool, src: bytes) -> bytes:
        sdp = ""
        if with_sdp:
            ip = ".".join(str(x) for x in src)
            sdp = (
                f"v=0\r\no=- {tag1} 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
                f"m=audio {rng.randrange(10000, 20000, 2)} RTP/AVP 0 101\r\n"
                "a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
            )
        head = (
            f"{first}\r\n"
            f"Via: SIP/2.0/UDP {'.'.join(str(x) for x in src)}:5060;branch=z9hG4bK{branch:x}\r\n"
            f"From: <sip:{caller}@{'.'.join(str(x) for x in a)}>;tag={tag1:x}\r\n"
            f"To: <sip:{callee}@{'.'.join(str(x) for x in b)}>;tag={tag2:x}\r\n"
            f"Call-ID: {sip_id}\r\nCSeq: {cseq}\r\nUser-Agent: vapifs-demo\r\n"
        )
        if with_sdp:
            head += "Content-Type: application/sdp\r\n"
        return (head + f"Content-Length: {len(sdp.encode())}\r\n\r\n" + sdp).encode()

    dialogue: list[tuple[int, bytes, bytes, bytes]] = [
        (start_ms - 900, a, b, msg(f"INVITE sip:{callee}@vapi SIP/2.0", "1 INVITE", True, a)),
        (start_ms - 880, b, a, msg("SIP/2.0 100 Trying", "1 INVITE", False, b)),
        (start_ms - 20, b, a, msg("SIP/2.0 200 OK", "1 INVITE", True, b)),
        (start_ms, a, b, msg(f"ACK sip:{callee}@vapi SIP/2.0", "1 ACK", False, a)),
    ]
    for k in range(extra_options):
        t = start_ms + (k + 1) * max(1, (end_ms - start_ms) // (extra_options + 1))
        dialogue.append(
            (t, a, b, msg(f"OPTIONS sip:{callee}@vapi SIP/2.0", f"{k + 2} OPTIONS", False, a))
        )
    dialogue += [
        (end_ms, b, a, msg(f"BYE sip:{caller}@carrier SIP/2.0", "2 BYE", False, b)),
        (end_ms + 35, a, b, msg("SIP/2.0 200 OK", "2 BYE", False, a)),
    ]
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for ident, (t, src, dst, payload) in enumerate(dialogue, start=1):
        frame = _udp_frame(src, dst, payload, ident)
        out.append(struct.pack("<IIII", t // 1000, (t % 1000) * 1000, len(frame), len(frame)))
        out.append(frame)
    return b"".join(out)


# ---------------------------------------------------------------- calls

_ASSISTANT_LINES = (
    "Hi, thanks for calling Northwind Dental, this is Riley. How can I help?",
    "Sure, I can help with that. Can I have your full name please?",
    "Thanks. I see an opening on Thursday at ten in the morning. Does that work?",
    "Great, you're booked. You'll get a text confirmation shortly.",
    "Is there anything else I can help you with today?",
    "I'm sorry about that. Let me check what happened with your order.",
    "Could you confirm the last four digits of the card on file?",
    "Thanks for your patience. Have a great day!",
)
_CUSTOMER_LINES = (
    "Hi, I'd like to book a cleaning appointment.",
    "It's Jordan Alvarez.",
    "Thursday works, thank you.",
    "No, that's all. Thanks!",
    "My package still hasn't arrived.",
    "Sure, it's four two one seven.",
    "Can you call me back later?",
    "Yes, that's right.",
)
_NAMES = (
    "Jordan Alvarez",
    "Priya Natarajan",
    "Sam O'Connell",
    "Mei Tanaka",
    "Lukas Becker",
    "Amara Okafor",
    "Chris Dubois",
    "Elena Petrova",
)
_ENDED_REASONS = (
    "customer-ended-call",
    "assistant-ended-call",
    "silence-timed-out",
    "customer-did-not-answer",
    "exceeded-max-duration",
    "pipeline-error-openai-llm-failed",
)
_DURATIONS = (3.0, 5.0, 8.0, 12.0, 15.0, 20.0, 24.0, 30.0, 36.0, 45.0, 60.0)


@dataclass
class _Files:
    """The artifacts of a call being made, and their file name suffixes."""

    artifacts: dict[str, bytes] = field(default_factory=dict)
    suffixes: dict[str, str] = field(default_factory=dict)


def _stable_url(org_id: str, call_id: str, created_ms: int, kind: str, suffix: str) -> str:
    return f"{STABLE_HOST}/{org_id}/{call_id}-{created_ms}-{kind}{suffix}"


def make_call(
    *,
    key: str,
    created_ms: int,
    org_id: str,
    assistant_id: str,
    call_type: str,
    phone_number_id: str | None = None,
    status: str = "ended",
    recordings: str = "wav",
    video: bool = False,
    logs: bool = True,
    pcap: bool = False,
    big_stereo_mb: int = 0,
    seconds: float | None = None,
    now_ms: int | None = None,
) -> FakeCall:
    """Build one call. key seeds everything random about it (id, audio, logs...).

    recordings is "wav", "mp3" or "none". With big_stereo_mb > 0 the only recording is a
    stereo WAV of about that many MiB (logs and pcap as requested). Each random stream is
    drawn from in a fixed order: the calls of a seed stay the same, byte for byte.
    """
    rng = _rng("call", key)
    call_id = _uuid(rng)
    phone = call_type != "webCall"
    ended = status == "ended"
    if seconds is None:
        seconds = rng.choice(_DURATIONS) + rng.random()
    rate = rng.choice((8000, 16000))
    media = _Files()
    seconds, big, turns = _recordings(
        media, key, call_id, rate, seconds, ended=ended, kind=recordings, big_mb=big_stereo_mb
    )
    started_ms, ended_ms, updated_ms = _times(rng, created_ms, seconds, ended, now_ms)
    artifacts, suffixes = media.artifacts, media.suffixes
    if ended and video and not big:
        artifacts["video"] = mp4_bytes(_rng("video", key), seconds, created_ms)
        suffixes["video"] = ".mp4"
    if ended and logs:
        n_errors = 0 if rng.random() < 0.15 else rng.randint(1, 12)
        artifacts["logs"] = logs_bytes(_rng("logs", key), call_id, started_ms, ended_ms, n_errors)
        suffixes["logs"] = ".jsonl.gz"
    customer_name = rng.choice(_NAMES)
    customer_number = "+1555" + "".join(str(rng.randrange(10)) for _ in range(7))
    if ended and pcap and phone:
        inbound = call_type == "inboundPhoneCall"
        artifacts["pcap"] = pcap_bytes(
            _rng("pcap", key), call_id, started_ms, ended_ms, customer_number, inbound
        )
        suffixes["pcap"] = ".pcap"
    messages, transcript = _conversation(rng, turns, seconds, started_ms, ended)
    artifact = _artifact_object(messages, transcript, media, org_id, call_id, created_ms)
    call: dict[str, Any] = {
        "id": call_id,
        "orgId": org_id,
        "type": call_type,
        "status": status,
        "createdAt": iso_ms(created_ms),
        "updatedAt": iso_ms(updated_ms),
        "startedAt": iso_ms(started_ms),
    }
    if ended:
        call["endedAt"] = iso_ms(ended_ms)
        call["endedReason"] = rng.choice(_ENDED_REASONS)
    call["cost"] = round(seconds / 60 * 0.11 + rng.random() * 0.02, 4)
    call["assistantId"] = assistant_id
    if phone and phone_number_id:
        call["phoneNumberId"] = phone_number_id
    customer: dict[str, Any] = {"name": customer_name}
    if phone:
        customer["number"] = customer_number
    call["customer"] = customer
    if ended:
        call["analysis"] = {
            "summary": f"{customer_name} called; the assistant handled the request.",
            "successEvaluation": "true" if rng.random() < 0.8 else "false",
        }
    call["artifact"] = artifact
    return FakeCall(call=call, artifacts=artifacts, suffixes=suffixes)


def _times(
    rng: random.Random, created_ms: int, seconds: float, ended: bool, now_ms: int | None
) -> tuple[int, int, int]:
    """When the call started, ended (or is up to, if still going on) and was last updated."""
    started_ms = created_ms + rng.randint(800, 3500)
    ended_ms = started_ms + int(seconds * 1000)
    if not ended:
        ended_ms = max(started_ms + 1000, now_ms if now_ms is not None else ended_ms)
    updated_ms = ended_ms + rng.randint(500, 6000) if ended else ended_ms
    return started_ms, ended_ms, updated_ms


def _recordings(
    media: _Files,
    key: str,
    call_id: str,
    rate: int,
    seconds: float,
    *,
    ended: bool,
    kind: str,
    big_mb: int,
) -> tuple[float, int, list[tuple[str, int, int]]]:
    """Add the call's recordings to `media`: (its length, that of a big stereo WAV or 0,
    the turns of its conversation)."""
    artifacts, suffixes = media.artifacts, media.suffixes
    audio_rng = _rng("audio", key)
    big_seconds = 0
    if ended and big_mb > 0:
        artifacts["stereo"], big_seconds = big_stereo_wav(audio_rng, big_mb)
        suffixes["stereo"] = ".wav"
        seconds = float(big_seconds)
    un = int(rate * _UNIT_SECONDS)
    n_samples = int(seconds * rate)
    units, turns = _plan(_rng("plan", key), math.ceil(n_samples / un) if not big_seconds else 60)
    if ended and not big_seconds and kind == "wav":
        artifacts.update(_wav_set(audio_rng, rate, units, n_samples))
        suffixes.update(dict.fromkeys(AUDIO_KINDS, ".wav"))
    elif ended and not big_seconds and kind == "mp3":
        frames = mp3_frames_for(seconds)
        for audio in AUDIO_KINDS:
            tag = f"vapifs-demo {call_id} {audio}".encode()
            artifacts[audio] = mp3_bytes(frames, channels=2 if audio == "stereo" else 1, tag=tag)
            suffixes[audio] = ".mp3"
    return seconds, big_seconds, turns


def _conversation(
    rng: random.Random,
    turns: list[tuple[str, int, int]],
    seconds: float,
    started_ms: int,
    ended: bool,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Messages and transcript, following the audio's turns (unit k starts at k * 0.2 s)."""
    messages: list[dict[str, Any]] = [
        {
            "role": "system",
            "message": "You are a friendly receptionist. Keep answers short.",
            "time": started_ms,
            "secondsFromStart": 0,
        }
    ]
    transcript: list[str] = []
    limit_units = math.ceil(seconds / _UNIT_SECONDS)
    for speaker, start_u, end_u in turns:
        if start_u >= limit_units or not ended:
            break
        end_u = min(end_u, limit_units)
        text = rng.choice(_ASSISTANT_LINES if speaker == "assistant" else _CUSTOMER_LINES)
        t0 = started_ms + int(start_u * _UNIT_SECONDS * 1000)
        t1 = started_ms + int(end_u * _UNIT_SECONDS * 1000)
        messages.append(
            {
                "role": "bot" if speaker == "assistant" else "user",
                "message": text,
                "time": t0,
                "endTime": t1,
                "secondsFromStart": round(start_u * _UNIT_SECONDS, 3),
                "duration": t1 - t0,
            }
        )
        transcript.append(("AI: " if speaker == "assistant" else "User: ") + text)
    return messages, transcript


def _artifact_object(
    messages: list[dict[str, Any]],
    transcript: list[str],
    media: _Files,
    org_id: str,
    call_id: str,
    created_ms: int,
) -> dict[str, Any]:
    """The call's `artifact`: its conversation and the stable URLs of its files."""
    artifact: dict[str, Any] = {"messages": messages, "transcript": "\n".join(transcript)}
    urls = {
        kind: _stable_url(org_id, call_id, created_ms, kind, media.suffixes[kind])
        for kind in media.artifacts
    }
    recording: dict[str, Any] = {}
    if "stereo" in urls:
        artifact["stereoRecordingUrl"] = urls["stereo"]
        recording["stereoUrl"] = urls["stereo"]
    if "mono" in urls:
        artifact["recordingUrl"] = urls["mono"]
        recording["mono"] = {
            "combinedUrl": urls["mono"],
            "customerUrl": urls["customer"],
            "assistantUrl": urls["assistant"],
        }
    if "video" in urls:
        artifact["videoRecordingUrl"] = urls["video"]
        recording["videoUrl"] = urls["video"]
    if recording:
        artifact["recording"] = recording
    if "pcap" in urls:
        artifact["pcapUrl"] = urls["pcap"]
    if "logs" in urls:
        artifact["logUrl"] = urls["logs"]
    return artifact


def _utc_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def generate_calls(
    now: datetime | None = None, *, seed: int = 0, count: int = 16, big_stereo_mb: int = 0
) -> list[FakeCall]:
    """count calls over the last days (newest first) plus one call 20 days old.

    Index (newest first) decides the features: 0 is the big call when big_stereo_mb > 0,
    1 is in progress (no artifacts), 3 has logs only, 4 and 7 are web calls with video,
    5 is MP3, 9 has logs and pcap but no recordings, 5 and 6 share their createdAt.
    """
    now_ms = epoch_ms(_utc_now(now))
    rng = _rng("schedule", seed)
    org = org_id_for(seed)
    assistants = assistant_ids_for(seed)
    numbers = phone_number_ids_for(seed)

    days = min(10, max(1, math.ceil(count / 2)))
    offsets = sorted(
        (i * days // max(1, count)) * _DAY_MS + rng.randint(5 * 60_000, 22 * 3_600_000)
        for i in range(count)
    )
    for i in range(1, count):
        if offsets[i] <= offsets[i - 1]:
            offsets[i] = offsets[i - 1] + 1
    if count >= 7:
        # Two calls with the very same createdAt: paging with createdAtLe must dedup them.
        offsets[6] = offsets[5]

    big_seconds = 0
    if big_stereo_mb > 0 and count > 0:
        # The big call's duration follows from its size; push everything back so that the
        # newest call has ended before now.
        big_seconds = max(1, (big_stereo_mb * 1024 * 1024) // 64000)
        shift = max(0, big_seconds * 1000 + 120_000 - offsets[0])
        offsets = [o + shift for o in offsets]

    calls: list[FakeCall] = []
    for i, off in enumerate(offsets):
        call_type = _CALL_TYPES[i % 3]
        status = "in-progress" if i == 1 else "ended"
        recordings = "mp3" if i == 5 else "wav"
        if i in (3, 9):
            recordings = "none"
        calls.append(
            make_call(
                key=f"{seed}:{i}",
                created_ms=now_ms - off,
                org_id=org,
                assistant_id=assistants[i % 3 if i % 4 else (i // 4) % 3],
                call_type=call_type,
                phone_number_id=numbers[i % 2],
                status=status,
                recordings=recordings,
                video=call_type == "webCall" and i in (4, 7),
                logs=True,
                pcap=i != 3,
                big_stereo_mb=big_stereo_mb if i == 0 else 0,
                now_ms=now_ms,
            )
        )
    old_ms = now_ms - 20 * _DAY_MS - _rng("old", seed).randint(3_600_000, 6 * 3_600_000)
    calls.append(
        make_call(
            key=f"{seed}:old",
            created_ms=old_ms,
            org_id=org,
            assistant_id=assistants[0],
            call_type="inboundPhoneCall",
            phone_number_id=numbers[0],
            pcap=True,
        )
    )
    return calls


def light_calls(
    count: int, now: datetime | None = None, *, seed: int = 0, days: float = 10.0
) -> list[FakeCall]:
    """count ended calls spread over the last `days`, newest first, with no artifacts at all.

    Cheap enough for tens of thousands (listing and paging tests); assistants and phone
    numbers are the seed's usual ones.
    """
    now_ms = epoch_ms(_utc_now(now))
    org = org_id_for(seed)
    assistants = assistant_ids_for(seed)
    rng = _rng("light", seed)
    span = max(1, int(days * _DAY_MS))
    out: list[FakeCall] = []
    for i in range(count):
        created_ms = now_ms - 60_000 - (i * span) // max(1, count)
        call: dict[str, Any] = {
            "id": _uuid(rng),
            "orgId": org,
            "type": "webCall",
            "status": "ended",
            "createdAt": iso_ms(created_ms),
            "updatedAt": iso_ms(created_ms + 30_000),
            "startedAt": iso_ms(created_ms + 1_000),
            "endedAt": iso_ms(created_ms + 25_000),
            "endedReason": "customer-ended-call",
            "assistantId": assistants[i % len(assistants)],
            "artifact": {"transcript": "AI: Hello.\nUser: Bye."},
        }
        out.append(FakeCall(call=call, artifacts={}, suffixes={}))
    return out


def extra_call(
    seed: int,
    created_at: datetime | None = None,
    *,
    base_seed: int = 0,
    org_id: str | None = None,
) -> FakeCall:
    """One more ended call (WAV, logs, pcap for phone calls), e.g. to add while mounted."""
    created_ms = epoch_ms(_utc_now(created_at))
    rng = _rng("extra-plan", seed)
    call_type = rng.choice(_CALL_TYPES)
    return make_call(
        key=f"extra:{base_seed}:{seed}",
        created_ms=created_ms,
        org_id=org_id or org_id_for(base_seed),
        assistant_id=rng.choice(assistant_ids_for(base_seed)),
        call_type=call_type,
        phone_number_id=rng.choice(phone_number_ids_for(base_seed)),
        video=call_type == "webCall",
        pcap=True,
        seconds=rng.choice(_DURATIONS[:6]) + rng.random(),
    )


def variant_artifact(fc: FakeCall, kind: str, seed: int) -> bytes:
    """Different deterministic content for one artifact of fc, of a different length."""
    old = fc.artifacts[kind]
    suffix = fc.suffixes[kind]
    for attempt in range(16):
        key = f"swap:{fc.id}:{kind}:{seed}:{attempt}"
        rng = _rng(key)
        grow = 1 + (seed + attempt) % 3
        if suffix == ".wav":
            rate = struct.unpack_from("<I", old, 24)[0]
            seconds = (len(old) - 44) // (4 if kind == "stereo" else 2) / rate + grow
            n = int(seconds * rate)
            units, _ = _plan(_rng("plan", key), math.ceil(n / int(rate * _UNIT_SECONDS)))
            data = _wav_set(rng, rate, units, n)[kind]
        elif suffix == ".mp3":
            data = mp3_bytes(
                len(old) // 384 + grow,
                channels=2 if kind == "stereo" else 1,
                tag=f"vapifs-demo swap {seed} {kind}".encode(),
            )
        elif suffix == ".mp4":
            data = mp4_bytes(rng, 5.0 + grow + rng.random(), 0)
        elif suffix == ".pcap":
            data = pcap_bytes(rng, fc.id, 0, 60_000, "+15550000000", True, grow)
        else:
            data = logs_bytes(rng, fc.id, 0, 60_000, rng.randint(1, 12))
        if len(data) != len(old):
            return data
    raise RuntimeError("could not build a different-length variant")  # pragma: no cover
