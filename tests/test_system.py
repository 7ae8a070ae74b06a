"""System mounts: the config file and VAPIFS_* variables, mount(8) and fstab, systemd units."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vapifs.cli import build_parser, main
from vapifs.config import ConfigError, helper_argv, options, resolve, subparser
from vapifs.demo.server import FakeVapi

from .conftest import ROOT, VAPIFS, force_unmount
from .test_mount import expected_files

VENV_BIN = Path(sys.executable).parent
UNITS = ROOT / "contrib" / "systemd"


def key_file(directory: Path, key: str, mode: int = 0o600) -> Path:
    path = directory / "key"
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("VAPIFS_") and k not in ("VAPI_PRIVATE_API_KEY", "VAPI_API_URL")
    }
    env.update(extra)
    return env


# --- the config file, VAPIFS_* variables and --print-config ---------------------------------


def print_config(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, tuple[str, str]]:
    """name -> (value, source) from `vapifs mount --print-config`, run in this process."""
    assert main(["mount", "--print-config", *argv]) == 0
    out = capsys.readouterr().out
    table = {}
    for line in out.splitlines():
        if line.startswith("# ") and " = " not in line:
            continue
        setting, _, source = line.rpartition("  # ")
        name, _, value = setting.strip().lstrip("# ").partition(" = ")
        table[name] = (value.strip(), source)
    return table


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("VAPIFS_") or name in ("VAPI_API_URL", "VAPI_PRIVATE_API_KEY"):
            monkeypatch.delenv(name)
    home = tmp_path / "config"
    (home / "vapifs").mkdir(parents=True)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home / "vapifs"


def test_precedence_is_flags_then_env_then_file_then_defaults(
    config_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (config_home / "config.toml").write_text(
        'cache-size = "20G"\n'
        "dir_ttl = 30\n"  # underscores are fine too
        'read-timeout = "45s"\n'
        'api-url = "http://file.example"\n'
        'o = ["allow_other", "uid=1000"]\n'
        "debug = true\n"
        'assistant = ["a1", "a2"]\n'
        'api-key-file = "~/vapi.key"\n'
    )
    monkeypatch.setenv("VAPIFS_DIR_TTL", "2m")
    monkeypatch.setenv("VAPIFS_READ_TIMEOUT", "50s")
    monkeypatch.setenv("VAPI_API_URL", "http://env.example")
    monkeypatch.setenv("VAPI_PRIVATE_API_KEY", "sk-never-printed")
    table = print_config(capsys, "/mnt/vapi", "--read-timeout", "1m")
    file = f"file {config_home / 'config.toml'}"
    assert table["cache-size"] == (str(20 << 30), file)
    assert table["dir-ttl"] == ("120.0", "env VAPIFS_DIR_TTL")
    assert table["read-timeout"] == ("60.0", "flag")
    assert table["stall-timeout"] == ("10.0", "default")
    assert table["api-url"] == ('"http://env.example"', "env VAPI_API_URL")
    assert table["fuse-options"] == ('["allow_other", "uid=1000"]', file)
    assert table["debug"] == ("true", file)
    assert table["assistant"] == ('["a1", "a2"]', file)
    assert table["api-key-file"] == (f'"{Path("~/vapi.key").expanduser()}"', file)
    assert table["foreground"] == ("false", "default")
    assert table["mountpoint"] == ('"/mnt/vapi"', "flag")


def test_the_key_is_never_printed_only_where_it_comes_from(
    config_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VAPI_PRIVATE_API_KEY", "sk-never-printed")
    assert main(["mount", "--print-config", "/mnt/vapi"]) == 0
    out = capsys.readouterr().out
    assert "sk-never-printed" not in out
    assert "# API key: from VAPI_PRIVATE_API_KEY" in out


def test_every_mount_option_has_a_file_key_and_a_variable(
    config_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Walks the parser, so that options added later are covered without editing this test."""
    actions = options(subparser(build_parser(), "mount"))
    table = print_config(capsys, "/mnt/vapi")
    for action in actions:
        name = next((s[2:] for s in action.option_strings if s.startswith("--")), None)
        name = name or action.dest.replace("_", "-")
        assert name in table, name
    monkeypatch.setenv("VAPIFS_CACHE_DIR", "/tmp/from-env")
    monkeypatch.setenv("VAPIFS_FOREGROUND", "yes")
    monkeypatch.setenv("VAPIFS_FUSE_OPTIONS", "allow_other,umask=077")
    table = print_config(capsys, "/mnt/vapi")
    assert table["cache-dir"] == ('"/tmp/from-env"', "env VAPIFS_CACHE_DIR")
    assert table["foreground"] == ("true", "env VAPIFS_FOREGROUND")
    assert table["fuse-options"] == ('["allow_other", "umask=077"]', "env VAPIFS_FUSE_OPTIONS")


def test_an_option_added_to_the_parser_is_read_from_file_and_env(tmp_path: Path) -> None:
    parser = build_parser()
    mount = subparser(parser, "mount")
    mount.add_argument("--max-widgets", type=int, default=3)
    mount.add_argument("--shiny", action="store_true")
    config = tmp_path / "c.toml"
    config.write_text("max_widgets = 7\nshiny = true\n")
    args = parser.parse_args(["mount", "/m"])
    settings = resolve(args, mount, set(), {}, config, explicit=True)
    assert (args.max_widgets, args.shiny) == (7, True)
    assert {s.name: s.source for s in settings}["max-widgets"] == f"file {config}"
    args = parser.parse_args(["mount", "/m"])
    resolve(args, mount, set(), {"VAPIFS_MAX_WIDGETS": "9"}, config, explicit=True)
    assert args.max_widgets == 9


def test_config_picks_another_file(
    config_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (config_home / "config.toml").write_text('cache-size = "20G"\n')
    other = tmp_path / "other.toml"
    other.write_text('cache-size = "2G"\n')
    assert print_config(capsys, "/m", "--config", str(other))["cache-size"][0] == str(2 << 30)
    monkeypatch.setenv("VAPIFS_CONFIG", str(other))
    assert print_config(capsys, "/m")["cache-size"] == (str(2 << 30), f"file {other}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('cache-sizes = "1G"\n', "unknown key 'cache-sizes'"),
        ('cache-size = "lots"\n', "cache-size: not a size: 'lots'"),
        ('cache_size = "1G"\ncache-size = "2G"\n', "set the same option"),
        ('api-key = "sk-secret"\n', "api-key: the API key is never read from here"),
        ("debug = 3\n", "debug: expected true or false"),
        ("dir-ttl = [1, 2]\n", "dir-ttl: expected one value"),
        ('timezone = "Mars/Olympus"\n', "--timezone 'Mars/Olympus' is not a known time zone"),
        ("cache-size = \n", "not valid TOML"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_file_and_key(
    config_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    expected: str,
) -> None:
    config = config_home / "config.toml"
    config.write_text(text)
    monkeypatch.setenv("VAPI_PRIVATE_API_KEY", "k")
    assert main(["mount", "/nonexistent-mountpoint"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert str(config) in err and expected in err, err
    assert "sk-secret" not in err


def test_bad_config_exits_2_from_the_command(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("read-timeout = 'soon'\n")
    env = clean_env(VAPI_PRIVATE_API_KEY="k")
    result = subprocess.run(
        [*VAPIFS, "mount", "--config", str(config), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == f"vapifs: {config}: read-timeout: not a duration: 'soon' (try 30s, 5m, 1d)\n"
    )
    missing = subprocess.run(
        [*VAPIFS, "mount", "--config", str(tmp_path / "none.toml"), str(tmp_path)],
        env=dict(env, VAPIFS_CACHE_SIZE="x"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (missing.returncode, missing.stderr.count("\n")) == (2, 1)
    assert "none.toml does not exist" in missing.stderr


def test_a_bad_variable_is_named(
    config_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VAPIFS_STALL_TIMEOUT", "whenever")
    assert main(["mount", "/nonexistent-mountpoint"]) == 2
    assert capsys.readouterr().err == (
        "vapifs: VAPIFS_STALL_TIMEOUT: not a duration: 'whenever' (try 30s, 5m, 1d)\n"
    )


# --- the form mount.fuse3 runs: vapifs SOURCE MOUNTPOINT -o OPTIONS -------------------------


def _helper(*argv: str) -> list[str] | None:
    return helper_argv(list(argv), subparser(build_parser(), "mount"))


def test_helper_options_are_sorted_into_vapifs_fuse_and_mount8_ones() -> None:
    assert _helper(
        "vapifs",
        "/mnt/vapi",
        "-o",
        "rw,dev,suid,_netdev,nofail,noauto,x-systemd.automount,comment=x,defaults,"
        "api_key_file=/etc/vapifs/key,cache-dir=/var/cache/vapifs,cache_size=20G,debug,"
        "foreground=no,assistant=a1,assistant=a2,config=/etc/vapifs/c.toml,allow_other,"
        "uid=1000,noatime",
    ) == [
        "mount",
        "/mnt/vapi",
        "--api-key-file=/etc/vapifs/key",
        "--cache-dir=/var/cache/vapifs",
        "--cache-size=20G",
        "--debug",
        "--assistant=a1",
        "--assistant=a2",
        "--config=/etc/vapifs/c.toml",
        "-o",
        "allow_other,uid=1000,noatime",
    ]
    assert _helper("vapifs", "/mnt/vapi") == ["mount", "/mnt/vapi"]
    assert _helper("/mnt/vapi") is None  # not that form: the usual "invalid choice"
    with pytest.raises(ConfigError, match="the API key is never read from here"):
        _helper("vapifs", "/m", "-o", "api_key=sk-secret")
    with pytest.raises(ConfigError, match="cache_dir needs a value"):
        _helper("vapifs", "/m", "-o", "cache_dir")


def _daemons(mountpoint: Path) -> list[int]:
    """vapifs processes serving mountpoint (ours: started by this test's mount)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if str(mountpoint).encode() in cmdline and any(b"vapifs" in a for a in cmdline[:2]):
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def helper_mount(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], capture_output=True)
    force_unmount(mountpoint)
    deadline = time.monotonic() + 10
    while _daemons(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in _daemons(mountpoint):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _assert_serving(mountpoint: Path, fake: FakeVapi) -> None:
    assert os.path.ismount(mountpoint)
    listed = os.listdir(mountpoint / "calls")
    call_id, files = next((c, f) for c, f in expected_files(fake).items() if c in listed and f)
    name, data = next(iter(files.items()))
    assert (mountpoint / "calls" / call_id / name).read_bytes() == data


def _mount_line(mountpoint: Path) -> str:
    with open("/proc/self/mounts") as f:
        return next(line for line in f if line.split()[1] == str(mountpoint))


@pytest.mark.mount
def test_an_fstab_line_mounts_with_mount8_and_unmounts_with_umount(
    fake: FakeVapi, tmp_path: Path, helper_mount: Path
) -> None:
    # util-linux clears PATH before running mount.fuse3, which then finds `vapifs` (type
    # fuse.vapifs) only in /usr/local/bin, /usr/bin, ...: name the program in the line instead.
    key = key_file(tmp_path, fake.api_key)
    options = (
        f"api_key_file={key},api_url={fake.api_url},cache_dir={tmp_path / 'cache'},"
        f"log_file={tmp_path / 'vapifs.log'},"
        "allow_other,_netdev,nofail,x-systemd.automount,noatime,umask=077"
    )
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{VENV_BIN / 'vapifs'}#vapifs {helper_mount} fuse {options} 0 0\n")
    started = time.monotonic()
    result = subprocess.run(
        ["mount", "--fstab", str(fstab), str(helper_mount)],
        env=clean_env(PATH=f"{VENV_BIN}:{os.environ['PATH']}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")
    _assert_serving(helper_mount, fake)  # at once: mount returned once the mount answered
    line = _mount_line(helper_mount).split()
    assert line[0] == "vapifs" and line[2] == "fuse.vapifs"
    assert {"ro", "nosuid", "nodev", "noatime", "allow_other"} <= set(line[3].split(","))
    assert oct(os.stat(helper_mount / "calls").st_mode & 0o777) == "0o500"
    daemons = _daemons(helper_mount)
    assert len(daemons) == 1
    print(f"mount(8) returned after {time.monotonic() - started:.2f}s")
    subprocess.run(["umount", str(helper_mount)], check=True, timeout=30)
    deadline = time.monotonic() + 10
    while _daemons(helper_mount) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _daemons(helper_mount), "the daemon outlived its mount"
    assert "unmounted" in (tmp_path / "vapifs.log").read_text()


@pytest.mark.mount
def test_mount_fuse3_runs_vapifs_for_type_fuse_vapifs(
    fake: FakeVapi, tmp_path: Path, helper_mount: Path
) -> None:
    """What mount(8) runs for `mount -t fuse.vapifs vapifs MNT -o ...` and fuse.vapifs lines."""
    key = key_file(tmp_path, fake.api_key)
    env = clean_env(PATH=f"{VENV_BIN}:{os.environ['PATH']}", XDG_CONFIG_HOME=str(tmp_path))
    (tmp_path / "vapifs").mkdir()
    (tmp_path / "vapifs" / "config.toml").write_text(
        f'api-url = "{fake.api_url}"\ncache-dir = "{tmp_path / "cache"}"\nforeground = true\n'
    )
    command = ["/sbin/mount.fuse3", "vapifs", str(helper_mount), "-t", "fuse.vapifs", "-o"]
    result = subprocess.run(
        [*command, f"api_key_file={key},rw,dev,suid"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )  # foreground = true in the file must not make mount(8) wait forever
    assert (result.returncode, result.stderr) == (0, "")
    _assert_serving(helper_mount, fake)
    assert "ro" in _mount_line(helper_mount).split()[3].split(",")
    subprocess.run(["umount", str(helper_mount)], check=True, timeout=30)

    key.chmod(0o644)
    refused = subprocess.run(
        [*command, f"api_key_file={key}"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1
    assert (
        refused.stderr
        == f"vapifs: --api-key-file {key} is readable by others: run chmod 600 {key}\n"
    )
    assert not os.path.ismount(helper_mount)


# --- systemd: the shipped units, driven the way systemd drives them --------------------------


def unit_commands(unit: Path, home: Path, instance: str = "") -> dict[str, list[str]]:
    """ExecStartPre/ExecStart/ExecStop of a unit file, with %h, %E, %i, %% substituted."""
    specifiers = {"h": str(home), "E": str(home / ".config"), "i": instance, "%": "%"}
    commands = {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("ExecStartPre", "ExecStart", "ExecStop"):
            text = "".join(
                specifiers[part[0]] + part[1:] if i else part
                for i, part in enumerate(value.strip().split("%"))
            )
            argv = shlex.split(text)
            argv[0] = argv[0].lstrip("-@+!:")
            commands[key.strip()] = argv
    return commands


class NotifySocket:
    """The datagram socket systemd listens on for a Type=notify service."""

    def __init__(self, directory: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"vapifs-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = str(directory / "notify")
            self.sock.bind(self.address)

    def receive(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        except TimeoutError:
            return None


@pytest.fixture
def service_home(tmp_path: Path, fake: FakeVapi) -> Path:
    """A home with vapifs in ~/.local/bin and a config file naming the fake and a key file."""
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "vapifs").symlink_to(VENV_BIN / "vapifs")
    (home / ".config" / "vapifs").mkdir(parents=True)
    key = key_file(home / ".config" / "vapifs", fake.api_key)
    (home / ".config" / "vapifs" / "config.toml").write_text(
        f'api-url = "{fake.api_url}"\napi-key-file = "{key}"\ncache-dir = "{tmp_path / "cache"}"\n'
    )
    return home


def start_service(
    commands: dict[str, list[str]], home: Path, notify: NotifySocket, stderr: Path
) -> subprocess.Popen[bytes]:
    env = clean_env(HOME=str(home), NOTIFY_SOCKET=notify.address)
    env.pop("XDG_CONFIG_HOME", None)
    subprocess.run(commands["ExecStartPre"], env=env, check=True)
    with open(stderr, "wb") as err:
        return subprocess.Popen(commands["ExecStart"], env=env, stderr=err)


@pytest.mark.mount
@pytest.mark.parametrize(
    ("unit", "instance", "abstract", "stop"),
    [
        ("vapifs.service", "", True, "SIGTERM"),
        ("vapifs@.service", "work", False, "ExecStop"),
    ],
)
def test_the_unit_reports_ready_once_the_mount_answers_and_stopping_on_stop(
    fake: FakeVapi,
    tmp_path: Path,
    service_home: Path,
    unit: str,
    instance: str,
    abstract: bool,
    stop: str,
) -> None:
    config = service_home / ".config" / "vapifs"
    if instance:
        (config / "config.toml").rename(config / f"{instance}.toml")
    commands = unit_commands(UNITS / unit, service_home, instance)
    assert "Type=notify" in (UNITS / unit).read_text()
    mountpoint = Path(commands["ExecStart"][-1])
    assert mountpoint.parent == service_home
    notify = NotifySocket(tmp_path, abstract)
    proc = start_service(commands, service_home, notify, tmp_path / "stderr")
    try:
        message = notify.receive(timeout=30)
        # Checked the moment READY=1 arrives: the mount already answers.
        assert os.path.ismount(mountpoint)
        assert os.listdir(mountpoint / "calls")
        assert message == "READY=1"
        assert proc.poll() is None
        if stop == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            subprocess.run(commands["ExecStop"], check=True, timeout=30)
        assert notify.receive(timeout=15) == "STOPPING=1"
        assert proc.wait(15) == 0
        assert not os.path.ismount(mountpoint)
        assert notify.receive(timeout=0.2) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        force_unmount(mountpoint)
        notify.sock.close()


@pytest.mark.mount
def test_the_unit_never_reports_ready_with_a_refused_key(
    tmp_path: Path, service_home: Path
) -> None:
    (service_home / ".config" / "vapifs" / "key").write_text("not-the-key\n")
    commands = unit_commands(UNITS / "vapifs.service", service_home)
    notify = NotifySocket(tmp_path, abstract=True)
    proc = start_service(commands, service_home, notify, tmp_path / "stderr")
    try:
        assert proc.wait(30) == 1
        assert notify.receive(timeout=0.2) is None
        assert "refused" in (tmp_path / "stderr").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.sock.close()


def test_the_units_are_valid_for_systemd(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    for unit in ("vapifs.service", "vapifs@.service"):
        shutil.copy(UNITS / unit, tmp_path / unit)
    target = tmp_path / "vapifs@work.service"
    target.symlink_to(tmp_path / "vapifs@.service")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "vapifs.service"), str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # ~/.local/bin/vapifs of whoever runs this need not exist; anything else is an error.
    problems = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and "is not executable" not in line
    ]
    assert not problems, result.stderr
