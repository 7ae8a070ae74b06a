"""HTTPS: whom the client trusts, what an untrusted certificate says, on the API and storage."""

from __future__ import annotations

import errno
import json
import os
import re
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from vapifs.cli import main
from vapifs.core import api_client, http_client
from vapifs.demo.certs import ThrowawayCA
from vapifs.demo.server import FakeVapi
from vapifs.errors import CertificateError
from vapifs.tls import TrustError, client_context

from .conftest import VAPIFS, MountFactory
from .test_mount import expected_files

# The one line a mount prints when the API's certificate is not trusted.
API_UNTRUSTED = re.compile(
    r"^vapifs: the certificate of the API at 127\.0\.0\.1:\d+ is not trusted "
    r"\((?P<why>[^()]+)\); if a proxy or a private CA signs it, name that CA with "
    r"--ca-file FILE or SSL_CERT_FILE$"
)


@pytest.fixture
def other_ca() -> Iterator[ThrowawayCA]:
    ca = ThrowawayCA("another throwaway CA")
    yield ca
    ca.close()


@pytest.fixture
def tls_fake() -> Iterator[FakeVapi]:
    with FakeVapi(seed=7, tls=True) as server:
        yield server


def _cas(ctx: ssl.SSLContext) -> int:
    return int(ctx.cert_store_stats()["x509_ca"])


# --- the trust store ----------------------------------------------------------------------


def test_trust_is_the_system_store_plus_ssl_cert_file_plus_ca_file(
    tls_fake: FakeVapi, other_ca: ThrowawayCA
) -> None:
    assert tls_fake.ca_file is not None
    system = _cas(client_context(environ={}))
    assert system > 10, "the system's CA store was not loaded"
    # SSL_CERT_FILE adds to the system's store rather than replacing it (httpx's own
    # default would trust that file alone), and --ca-file adds to both.
    env = {"SSL_CERT_FILE": str(other_ca.ca_file)}
    assert _cas(client_context(environ=env)) == system + 1
    both = client_context(Path(tls_fake.ca_file), environ=env)
    assert _cas(both) == system + 2
    assert both.verify_mode == ssl.CERT_REQUIRED and both.check_hostname


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), (b"not a certificate\n", "holds no PEM certificate")],
)
def test_an_unusable_ca_file_is_one_line(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TrustError, match=f"^--ca-file {re.escape(str(path))} {message}$"):
        client_context(path, environ={})
    with pytest.raises(TrustError, match=f"^SSL_CERT_FILE {re.escape(str(path))} {message}$"):
        client_context(environ={"SSL_CERT_FILE": str(path)})


def test_mount_refuses_an_unusable_ca_file_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mnt").mkdir()
    monkeypatch.setenv("VAPI_PRIVATE_API_KEY", "k")
    argv = ["mount", str(tmp_path / "mnt"), "--ca-file", str(tmp_path / "nope.pem")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vapifs: --ca-file {tmp_path / 'nope.pem'} does not exist"]
    assert not os.path.ismount(tmp_path / "mnt")


def test_ca_file_comes_from_the_environment_and_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('ca-file = "/etc/corp/ca.pem"\n')
    monkeypatch.setenv("VAPIFS_CONFIG", str(config))
    monkeypatch.delenv("VAPIFS_CA_FILE", raising=False)
    assert main(["mount", "--print-config", str(tmp_path)]) == 0
    assert re.search(r'^ca-file = "/etc/corp/ca\.pem" +# file ', capsys.readouterr().out, re.M)
    monkeypatch.setenv("VAPIFS_CA_FILE", "/etc/other/ca.pem")
    assert main(["mount", "--print-config", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r'^ca-file = "/etc/other/ca\.pem" +# env VAPIFS_CA_FILE$', out, re.M)


async def test_the_api_client_verifies_and_names_an_untrusted_host(tls_fake: FakeVapi) -> None:
    assert tls_fake.ca_file is not None
    async with http_client(read_timeout=10, stall_timeout=5) as client:
        api = api_client(client, tls_fake.api_url, tls_fake.api_key)
        started = time.monotonic()
        with pytest.raises(CertificateError) as info:
            await api.check_key()
        # Retrying cannot make a certificate trusted: one attempt, no backoff.
        assert time.monotonic() - started < 2
        assert api.attempts["list"] == 1
        host = tls_fake.api_url.removeprefix("https://")
        assert f"the API at {host} is not trusted" in str(info.value)
    # The server learns of the refusal from the client's alert, a moment after the client.
    deadline = time.monotonic() + 5
    while tls_fake.counters().get("tls.failed", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tls_fake.counters()["tls.failed"] == 1
    async with http_client(
        read_timeout=10, stall_timeout=5, ca_file=Path(tls_fake.ca_file)
    ) as client:
        api = api_client(client, tls_fake.api_url, tls_fake.api_key)
        await api.check_key()
        assert len(await api.list_calls(limit="5")) == 5
    assert tls_fake.counters()["api.tls_handshakes"] == 1


def test_plain_http_client_cannot_talk_to_the_tls_fake(tls_fake: FakeVapi) -> None:
    # The fake really speaks TLS: a plain-HTTP request to it gets no answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_fake.api_url.replace("https://", "http://") + "/call", timeout=5)


# --- real mounts ----------------------------------------------------------------------------


@pytest.mark.mount
@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "daemon"])
@pytest.mark.parametrize("trusted", ["none", "wrong-ca"])
def test_an_untrusted_api_certificate_is_one_line_exit_1_nothing_mounted(
    tls_fake: FakeVapi, other_ca: ThrowawayCA, tmp_path: Path, foreground: bool, trusted: str
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = dict(os.environ, VAPI_PRIVATE_API_KEY=tls_fake.api_key)
    env.pop("SSL_CERT_FILE", None)
    args = [*VAPIFS, "mount", str(mountpoint), "--api-url", tls_fake.api_url]
    args += ["--cache-dir", str(tmp_path / "c"), "--log-file", str(tmp_path / "log")]
    if trusted == "wrong-ca":
        args += ["--ca-file", str(other_ca.ca_file)]
    if foreground:
        args.append("-f")
    started = time.monotonic()
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 15
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    match = API_UNTRUSTED.match(lines[0])
    assert match, lines[0]
    assert lines[0].count(tls_fake.api_url.removeprefix("https://")) == 1
    assert "certificate" in match["why"] or "issuer" in match["why"], match["why"]
    assert not os.path.ismount(mountpoint)
    assert tls_fake.api_key not in result.stderr
    assert tls_fake.counters()["api.requests"] == 0  # no request ever went out in clear


@pytest.mark.mount
def test_ssl_cert_file_alone_is_trusted(
    tls_fake: FakeVapi, mount_factory: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls_fake.ca_file is not None
    monkeypatch.setenv("SSL_CERT_FILE", tls_fake.ca_file)
    m = mount_factory(server=tls_fake, trust=False)
    call_id, files = next(iter(expected_files(tls_fake).items()))
    for name, data in files.items():
        assert (m.calls / call_id / name).read_bytes() == data, name
    counters = tls_fake.counters()
    assert counters["api.tls_handshakes"] >= 1 and counters["storage.tls_handshakes"] >= 1
    assert counters.get("tls.failed", 0) == 0


@pytest.mark.mount
def test_an_untrusted_storage_certificate_is_eio_and_one_log_line(
    mount_factory: MountFactory, other_ca: ThrowawayCA
) -> None:
    # The API is trusted (--ca-file), the storage host shows another CA's certificate.
    with FakeVapi(seed=7, tls=True, storage_certs=other_ca) as fake:
        m = mount_factory(server=fake)
        call_id = next(c for c, fc in fake.calls.items() if "stereo" in fc.artifacts)
        path = m.calls / call_id / "stereo.wav"
        started = time.monotonic()
        for _ in range(3):
            with pytest.raises(OSError) as info, open(path, "rb") as f:
                f.read()
            assert info.value.errno == errno.EIO
        assert time.monotonic() - started < 10
        host = fake.storage_url.removeprefix("https://")
        wanted = f"the certificate of the storage host {host} is not trusted"
        lines = [line for line in m.log_text().splitlines() if wanted in line]
        assert len(lines) == 1, m.log_text()
        assert "X-Amz" not in m.log_text() and fake.api_key not in m.log_text()
        # Nothing was asked of storage in clear, and no attempt was retried in a loop.
        assert fake.counters()["storage.requests"] == 0
        assert fake.counters()["tls.failed"] <= 8
        m.stop()


def test_prefetch_verifies_too(tls_fake: FakeVapi, tmp_path: Path) -> None:
    assert tls_fake.ca_file is not None
    call_id, files = next(iter(expected_files(tls_fake).items()))
    env = dict(os.environ, VAPI_PRIVATE_API_KEY=tls_fake.api_key)
    env.pop("SSL_CERT_FILE", None)
    args = [*VAPIFS, "prefetch", call_id, "--api-url", tls_fake.api_url, "--json"]
    args += ["--cache-dir", str(tmp_path / "c")]
    refused = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "the certificate of the API at 127.0.0.1:" in lines[0], lines
    done = subprocess.run(
        [*args, "--ca-file", tls_fake.ca_file], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    totals = json.loads(done.stdout)
    assert tls_fake.counters()["storage.bytes"] == sum(len(d) for d in files.values()), totals
