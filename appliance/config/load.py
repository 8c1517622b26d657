"""Load the configuration: TOML, then `APPLIANCE_*` overrides, then secret files, then validation.

Every problem is collected (not just the first) and reported by dotted key path with the rule it
broke. Values are never echoed, so a secret cannot leak through an error message. A value from
the environment also names its variable, and a misspelled key or variable gets "did you mean".
"""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from appliance.config.model import Config
from appliance.errors import ConfigError, Problem

DEFAULT_PATH = "/etc/appliance/config.toml"
ENV_PREFIX = "APPLIANCE_"
# Variables of ours that are not config keys.
RESERVED_ENV = frozenset({"APPLIANCE_CONFIG", "APPLIANCE_SKIP_MIGRATIONS"})


@dataclass(frozen=True)
class FieldInfo:
    path: tuple[str, ...]
    secret: bool
    is_list: bool


def _fields(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], FieldInfo]:
    """Every leaf field of the model tree, keyed by its path."""
    out: dict[tuple[str, ...], FieldInfo] = {}
    hints = typing.get_type_hints(model)
    for name in model.model_fields:
        hint = hints[name]
        path = (*prefix, name)
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            out.update(_fields(hint, path))
            continue
        args = typing.get_args(hint)
        secret = hint is SecretStr or SecretStr in args
        is_list = typing.get_origin(hint) is list
        out[path] = FieldInfo(path, secret, is_list)
    return out


FIELDS = _fields(Config)
SECRETS = [f.path for f in FIELDS.values() if f.secret]


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(path).upper()


# Every variable name we accept, for "did you mean" on a misspelled one.
ENV_NAMES = sorted(
    {env_name(path) for path in FIELDS}
    | {env_name(path) + "__FILE" for path in SECRETS}
    | set(RESERVED_ENV)
)


def did_you_mean(name: str, candidates: list[str]) -> str:
    """` (did you mean X?)` for the closest candidate, or nothing when none is close."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _env_suggestion(name: str) -> str:
    # Compared without the prefix every name shares, which would make anything look close.
    close = difflib.get_close_matches(
        name.removeprefix(ENV_PREFIX), [n.removeprefix(ENV_PREFIX) for n in ENV_NAMES], 1, 0.6
    )
    return f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""


def _keys_at(path: tuple[str, ...]) -> list[str]:
    """The keys a TOML table at `path` accepts (a secret's `<key>_file` included)."""
    model: type[BaseModel] = Config
    for part in path:
        hint = typing.get_type_hints(model).get(part)
        if not (isinstance(hint, type) and issubclass(hint, BaseModel)):
            return []
        model = hint
    names = list(model.model_fields)
    return names + [
        n + "_file" for n in names if (*path, n) in FIELDS and FIELDS[(*path, n)].secret
    ]


def dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path)


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = tree
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    return node if isinstance(node, dict) else None


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _read_toml(path: Path, problems: list[Problem]) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        problems.append(Problem("APPLIANCE_CONFIG", f"config file {path} does not exist"))
    except PermissionError:
        problems.append(Problem("APPLIANCE_CONFIG", f"config file {path} is not readable"))
    except tomllib.TOMLDecodeError as exc:
        problems.append(Problem("(file)", f"{path} is not valid TOML: {exc}"))
    return {}


def _env_layer(
    environ: Mapping[str, str], problems: list[Problem], sources: dict[tuple[str, ...], str]
) -> dict[str, Any]:
    """`APPLIANCE_<SECTION>__<KEY>` (and `…__FILE` for secrets) as a tree like the TOML's.

    `sources` records which variable set each key, so a bad value names the variable too.
    """
    layer: dict[str, Any] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        parts = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
        if parts[-1] == "file" and parts[:-1] in FIELDS and FIELDS[parts[:-1]].secret:
            _set(layer, (*parts[:-2], parts[-2] + "_file"), environ[name])
            sources[parts[:-1]] = name
            continue
        field = FIELDS.get(parts)
        if field is None:
            problems.append(
                Problem(
                    name,
                    "unknown setting: use APPLIANCE_<SECTION>__<KEY> for a config key"
                    + _env_suggestion(name),
                )
            )
            continue
        sources[parts] = name
        value: Any = environ[name]
        if field.is_list:
            value = [item.strip() for item in value.split(",") if item.strip()]
        _set(layer, parts, value)
    return layer


def _merge_layer(base: dict[str, Any], layer: dict[str, Any]) -> None:
    """Overlay env onto TOML; a value or file from env replaces both forms from the file."""
    for path in SECRETS:
        section = _get(layer, path[:-1])
        if section is not None and (path[-1] in section or path[-1] + "_file" in section):
            target = _get(base, path[:-1])
            if target is not None:
                target.pop(path[-1], None)
                target.pop(path[-1] + "_file", None)

    def overlay(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                overlay(dst[key], value)
            else:
                dst[key] = value

    overlay(base, layer)


def _resolve_secret_files(tree: dict[str, Any], problems: list[Problem]) -> None:
    for path in SECRETS:
        section = _get(tree, path[:-1])
        if section is None or path[-1] + "_file" not in section:
            continue
        file_key = path[-1] + "_file"
        file_path = section.pop(file_key)
        if path[-1] in section:
            problems.append(Problem(dotted(path), f"set either {path[-1]} or {file_key}, not both"))
            continue
        if not isinstance(file_path, str) or not file_path:
            problems.append(Problem(dotted((*path[:-1], file_key)), "must be a file path"))
            continue
        try:
            section[path[-1]] = Path(file_path).read_text().rstrip("\r\n")
        except OSError as exc:
            problems.append(
                Problem(dotted((*path[:-1], file_key)), f"cannot read {file_path}: {exc.strerror}")
            )


def _problems_from(
    error: ValidationError, sources: Mapping[tuple[str, ...], str] | None = None
) -> list[Problem]:
    """One problem per error; a key set from the environment names its variable."""
    sources = sources or {}
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        loc = tuple(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden" and loc[-1].removesuffix("_file") in _keys_at(
            loc[:-1]
        ):
            rule = "unknown key: only secrets may come from a file"
        elif item["type"] == "extra_forbidden":
            rule = "unknown key" + did_you_mean(loc[-1], _keys_at(loc[:-1]))
        else:
            rule = item["msg"].removeprefix("Value error, ")
        # A list item's loc goes one deeper than the key (appliance.roles.1).
        variable = next(
            (sources[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in sources), None
        )
        if variable is not None:
            rule += f" (set by {variable})"
        problems.append(Problem(dotted(loc) or "(root)", rule))
    return problems


def config_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("APPLIANCE_CONFIG") or DEFAULT_PATH)


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the validated config, or raise ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    problems: list[Problem] = []
    tree = _read_toml(path or config_path(environ), problems)
    _resolve_secret_files(tree, problems)
    sources: dict[tuple[str, ...], str] = {}
    layer = _env_layer(environ, problems, sources)
    _resolve_secret_files(layer, problems)
    _merge_layer(tree, layer)
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        problems.extend(_problems_from(exc, sources))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config
