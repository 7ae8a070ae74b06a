"""Where mount options come from besides flags: VAPIFS_* variables, the config file, mount(8)."""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

# Options about reading the others, not about the mount.
_META = {"help", "config", "print_config"}
# The key itself never comes from a file, a variable of ours or an option value: it would sit
# in a file anyone may copy, or show in `ps` and /proc/mounts. Only api-key-file (mode 600).
_KEY_NAMES = {"api-key", "key", "private-api-key", "vapi-private-api-key"}
# Variables that predate VAPIFS_*: still read, after the VAPIFS_ one.
_ENV_ALIASES = {"api_url": ("VAPI_API_URL",)}
# What mount(8) and mount.fuse3 hand to every helper and vapifs has no use for: always
# read-only, nosuid and nodev (libfuse's default, and nothing here is a device or setuid).
_MOUNT8_ONLY = {
    "",
    "defaults",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "nofail",
    "_netdev",
    "rw",
    "ro",
    "dev",
    "suid",
    "drop_privileges",
}
_MOUNT8_PREFIXES = ("x-", "comment=", "setuid=")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(Exception):
    """A bad config file, variable or -o option: one line naming where it came from."""


@dataclass
class Setting:
    """One mount option as resolved: its name, and 'flag', 'env NAME', 'file PATH' or 'default'."""

    action: argparse.Action
    name: str
    source: str


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[command]
            return found
    raise KeyError(command)


def command_names(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def options(mount: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option of `vapifs mount`, whoever added it: each one can come from file or env."""
    return [a for a in mount._actions if a.option_strings and a.dest not in _META]


def name_of(action: argparse.Action) -> str:
    longs = [s[2:] for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else action.dest.replace("_", "-")


def _names(action: argparse.Action) -> set[str]:
    names = {s[2:] for s in action.option_strings if s.startswith("--")}
    if not names:  # -o: its dest, and its letter
        names = {s[1:] for s in action.option_strings}
    names.add(action.dest.replace("_", "-"))
    return names


def env_names(action: argparse.Action) -> list[str]:
    own = "VAPIFS_" + name_of(action).upper().replace("-", "_")
    return [own, *_ENV_ALIASES.get(action.dest, ())]


def _normal(key: str) -> str:
    return key.strip().replace("_", "-")


def _boolean(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError("expected true or false")


def _one(action: argparse.Action, raw: object) -> object:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError("expected a string or a number")
    text = str(raw)
    value: object = text
    if callable(action.type):
        try:
            value = action.type(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ValueError(str(exc) or f"bad value {text!r}") from None
    if isinstance(value, Path):
        value = value.expanduser()  # no shell expanded it
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{text!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def convert(action: argparse.Action, raw: object, *, split: bool) -> object:
    """A value from a file (TOML types) or a variable (text) as the option's own type."""
    if action.nargs == 0:
        flag = _boolean(raw)
        if isinstance(action, argparse.BooleanOptionalAction):
            return flag
        return action.const if flag else action.default
    if isinstance(action, argparse._AppendAction):
        if isinstance(raw, list):
            items: list[object] = list(raw)
        elif isinstance(raw, str) and split:
            items = [item for item in raw.split(",") if item.strip()]
        else:
            items = [raw]
        return [_one(action, item) for item in items]
    if isinstance(raw, list | dict):
        raise ValueError("expected one value")
    return _one(action, raw)


def load(path: Path, explicit: bool) -> dict[str, object]:
    """The file's keys (as written) and values; {} when the default file does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _key_refused(where: str, key: str, instead: str) -> ConfigError:
    return ConfigError(
        f"{where}: {key}: the API key is never read from here; put it in a file of mode 600 "
        f"and name that file with {instead}, or set VAPI_PRIVATE_API_KEY"
    )


def resolve(
    args: argparse.Namespace,
    mount: argparse.ArgumentParser,
    given: Iterable[str],
    environ: Mapping[str, str],
    path: Path,
    explicit: bool,
) -> list[Setting]:
    """Fill in `args` by precedence (flags > env > file > defaults); say where each came from."""
    actions = options(mount)
    by_name = {name: action for action in actions for name in _names(action)}
    table = load(path, explicit)
    from_file: dict[str, tuple[str, object]] = {}
    for key, raw in table.items():
        name = _normal(key)
        if name in _KEY_NAMES:
            raise _key_refused(str(path), key, "api-key-file")
        action = by_name.get(name)
        if action is None:
            raise ConfigError(
                f"{path}: unknown key {key!r} (the keys are the long options of "
                "vapifs mount --help)"
            )
        if action.dest in from_file:
            raise ConfigError(f"{path}: {key} and {from_file[action.dest][0]} set the same option")
        from_file[action.dest] = (key, raw)
    given = set(given)
    return [
        Setting(action, name_of(action), _fill(args, action, given, environ, from_file, path))
        for action in actions
    ]


def _fill(
    args: argparse.Namespace,
    action: argparse.Action,
    given: set[str],
    environ: Mapping[str, str],
    from_file: Mapping[str, tuple[str, object]],
    path: Path,
) -> str:
    """Set one option by precedence (flag > env > file > default); say where it came from."""
    if action.dest in given:
        return "flag"
    for variable in env_names(action):
        text = environ.get(variable, "")
        if text.strip():
            try:
                setattr(args, action.dest, convert(action, text, split=True))
            except ValueError as exc:
                raise ConfigError(f"{variable}: {exc}") from None
            return f"env {variable}"
    if action.dest in from_file:
        key, raw = from_file[action.dest]
        try:
            setattr(args, action.dest, convert(action, raw, split=False))
        except ValueError as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from None
        return f"file {path}"
    return "default"


# Options of mount that other commands also take and must agree on with the mount (the
# cache it uses, the API it talks to); mount's --since/--until mean something else there.
_NOT_SHARED = {"since", "until"}


def resolve_shared(
    args: argparse.Namespace,
    command: argparse.ArgumentParser,
    mount: argparse.ArgumentParser,
    given: Iterable[str],
    environ: Mapping[str, str],
    path: Path,
    explicit: bool,
) -> None:
    """Fill the options `command` shares with mount from VAPIFS_* and the config file.

    `vapifs prefetch` and `vapifs cache` then work on the cache and API the mount uses when
    those are set in the environment or config.toml rather than by flags. Keys of the file
    that only mount takes are left alone (they are checked when mounting).
    """
    ours = {a.dest for a in command._actions if a.option_strings}
    shared = [a for a in options(mount) if a.dest in ours and a.dest not in _NOT_SHARED]
    if not shared:
        return
    table = load(path, explicit)
    from_file: dict[str, tuple[str, object]] = {}
    for key, raw in table.items():
        for action in shared:
            if _normal(key) in _names(action):
                from_file[action.dest] = (key, raw)
    given = set(given)
    for action in shared:
        _fill(args, action, given, environ, from_file, path)


def blame(message: str, settings: Iterable[Setting]) -> str:
    """Add to an error about --some-option where its value came from, when not from a flag."""
    for setting in settings:
        if setting.source in ("flag", "default"):
            continue
        if re.search(rf"--{re.escape(setting.name)}(?![\w-])", message):
            return f"{message} (set by {setting.source})"
    return message


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value))


def print_config(
    args: argparse.Namespace,
    settings: list[Setting],
    path: Path,
    found: bool,
    key_source: str,
    out: TextIO,
) -> None:
    """The resolved options as a config file (never the key), each with where it came from."""
    lines = [
        "# vapifs mount: the options in effect; precedence: flag > env > file > default",
        f"# config file: {path}{'' if found else ' (none)'}",
        f"# API key: {key_source}",
    ]
    rows = [("mountpoint", _toml(args.mountpoint), "flag")]
    for setting in settings:
        value = getattr(args, setting.action.dest)
        if value is None:
            rows.append((f"# {setting.name}", "(not set)", setting.source))
        else:
            rows.append((setting.name, _toml(value), setting.source))
    width = max(len(f"{name} = {value}") for name, value, _ in rows)
    for name, value, source in rows:
        lines.append(f"{f'{name} = {value}':<{width}}  # {source}")
    out.write("\n".join(lines) + "\n")


def helper_argv(argv: list[str], mount: argparse.ArgumentParser) -> list[str] | None:
    """`vapifs SOURCE MOUNTPOINT [-o OPTIONS]`, the form mount.fuse3 runs for mount(8) and
    fstab, as `vapifs mount` arguments; None if argv has another shape.

    vapifs options come as key=value (api_key_file=..., cache-size=...) or, for switches, as a
    bare word (debug); mount(8)'s own options are dropped; the rest are FUSE options.
    """
    positional: list[str] = []
    chunks: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "-o":
            chunks.append(next(words, ""))
        elif word.startswith("-o"):
            chunks.append(word[2:])
        elif word == "-v":
            continue
        elif word.startswith("-"):
            return None
        else:
            positional.append(word)
    if len(positional) != 2:
        return None
    by_name = {name: action for action in options(mount) for name in _names(action)}
    by_name.update((a.dest, a) for a in mount._actions if a.dest == "config")
    translated = ["mount", positional[1]]
    fuse: list[str] = []
    for chunk in chunks:
        for option in chunk.split(","):
            option = option.strip()
            name, has_value, value = option.partition("=")
            key = _normal(name)
            if option in _MOUNT8_ONLY or option.startswith(_MOUNT8_PREFIXES):
                continue
            if key in _KEY_NAMES:
                raise _key_refused("-o", name, "api_key_file=FILE")
            action = by_name.get(key)
            if action is None or action.dest == "fuse_options":
                fuse.append(option)
                continue
            flag = "--" + name_of(action) if action.dest != "config" else "--config"
            if action.nargs == 0:
                try:
                    if not has_value or _boolean(value):
                        translated.append(flag)
                except ValueError as exc:
                    raise ConfigError(f"-o {option}: {exc}") from None
            elif not has_value or not value:
                raise ConfigError(f"-o {name} needs a value ({name}=...)")
            else:
                translated.append(f"{flag}={value}")
    if fuse:
        translated += ["-o", ",".join(fuse)]
    return translated
