"""Configuration: every error class, env overrides, secret files, redaction, the example file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Config, load_config, redacted
from appliance.config.load import FIELDS, dotted
from appliance.errors import ConfigError
from tests.support import write_toml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


def problems(path: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {})
    return {p.key: p.rule for p in info.value.problems}


@pytest.fixture
def cfg(tmp_path: Path) -> Any:
    def write(tree: dict[str, Any]) -> Path:
        return write_toml(tmp_path / "config.toml", tree)

    return write


def test_example_loads_and_documents_every_field() -> None:
    config = load_config(EXAMPLE, {})
    assert config.api.port == 8080
    text = EXAMPLE.read_text()
    # Section headers in order, and each key (set or commented out) under its own section.
    sections: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        header = re.match(r"^\[([a-z0-9_.]+)\]$", line)
        if header:
            current = header[1]
            continue
        key = re.match(r"^#?\s*([a-z_]+)\s*=", line)
        if key and current:
            sections.setdefault(current, "")
            sections[current] += key[1] + "\n"
    missing = [
        dotted(path)
        for path in FIELDS
        if path[-1] not in sections.get(".".join(path[:-1]), "").split("\n")
    ]
    assert missing == [], f"config.example.toml does not document: {missing}"


def test_example_defaults_match_model_defaults() -> None:
    """A documented default that differs from the code's default would mislead admins."""
    example = json.loads(json.dumps(redacted(load_config(EXAMPLE, {}))))
    defaults = json.loads(json.dumps(redacted(Config())))
    # Keys the example deliberately sets for the local quick start (not defaults).
    local = {"postgres.dsn", "s3.endpoint_url", "s3.path_style", "s3.access_key_id",
             "s3.secret_access_key", "appliance.instance"}  # fmt: skip
    differ = [
        dotted(path)
        for path in FIELDS
        if dotted(path) not in local and _at(example, path) != _at(defaults, path)
    ]
    assert differ == []


def _at(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def test_missing_file_is_named(tmp_path: Path) -> None:
    found = problems(tmp_path / "nope.toml")
    assert "does not exist" in found["APPLIANCE_CONFIG"]


def test_invalid_toml_reports_position(cfg: Any) -> None:
    path = cfg({})
    path.write_text("[api]\nport = = 1\n")
    found = problems(path)
    assert "not valid TOML" in found["(file)"]
    assert "line 2" in found["(file)"]


def test_unknown_keys_rejected_in_every_section(cfg: Any) -> None:
    tree: dict[str, Any] = {section: {"bogus": 1} for section in Config.model_fields}
    tree["schedules"] = {"prune_job_log": {"bogus": 1}, "nope": {"cron": "* * * * *"}}
    tree["extra_section"] = {"a": 1}
    found = problems(cfg(tree))
    expected = {f"{s}.bogus" for s in Config.model_fields if s != "schedules"}
    expected |= {"schedules.prune_job_log.bogus", "schedules.nope", "extra_section"}
    assert expected <= set(found)
    assert all(found[key] == "unknown key" for key in expected)


def test_type_and_range_errors_name_key_and_rule(cfg: Any) -> None:
    found = problems(
        cfg(
            {
                "api": {"port": 70000, "workers": "many"},
                "appliance": {"roles": ["api", "mailer"], "log_level": "loud"},
                "s3": {"bucket": "No_Such", "endpoint_url": "ftp://x"},
                "schedules": {"prune_job_log": {"cron": "every day"}},
                "redis": {"url": "http://x", "key_prefix": "has space"},
            }
        )
    )
    assert "less than or equal to 65535" in found["api.port"]
    assert "valid integer" in found["api.workers"]
    assert "appliance.roles.1" in found
    assert "appliance.log_level" in found
    assert "bucket name" in found["s3.bucket"]
    assert "http://" in found["s3.endpoint_url"]
    assert "cron" in found["schedules.prune_job_log.cron"]
    assert "redis://" in found["redis.url"]
    assert "1-64 characters" in found["redis.key_prefix"]


def test_cross_field_rules(cfg: Any) -> None:
    found = problems(
        cfg(
            {
                "postgres": {"pool_min": 20, "pool_max": 5},
                "s3": {"access_key_id": "only-half"},
                "appliance": {"roles": ["api", "api"]},
                "messages": {"max_batch": 500, "rate_burst": 100},
                "oidc": {"enabled": True, "issuer": "https://sso.example.com"},
            }
        )
    )
    assert "pool_min must not exceed pool_max" in found["postgres"]
    assert "max_batch must not exceed rate_burst" in found["messages"]
    assert "audience must be set" in found["oidc"]
    assert "go together" in found["s3"]
    assert "must not repeat" in found["appliance.roles"]


def test_env_overrides_typed_by_field(cfg: Any) -> None:
    path = cfg({"api": {"port": 9000}, "postgres": {"dsn": "postgresql://a@h/db"}})
    config = load_config(
        path,
        {
            "APPLIANCE_API__PORT": "9100",
            "APPLIANCE_APPLIANCE__ROLES": "api, worker",
            "APPLIANCE_REDIS__REQUIRE_PERSISTENCE": "true",
            "APPLIANCE_SCHEDULES__PRUNE_JOB_LOG__KEEP_DAYS": "3",
            # A password of digits stays a string: never guess types beyond the field's.
            "APPLIANCE_POSTGRES__DSN": "postgresql://u:123456@h/db",
        },
    )
    assert config.api.port == 9100
    assert config.appliance.roles == ["api", "worker"]
    assert config.redis.require_persistence is True
    assert config.schedules.prune_job_log.keep_days == 3
    assert config.postgres.dsn.get_secret_value() == "postgresql://u:123456@h/db"


def test_env_errors_name_the_variable_or_key(cfg: Any) -> None:
    found = problems(
        cfg({}),
        {
            "APPLIANCE_API__PROT": "1",
            "APPLIANCE_NOSECTION": "1",
            "APPLIANCE_API__PORT": "eighty",
            "APPLIANCE_CONFIGG": "typo",
        },
    )
    assert "unknown setting" in found["APPLIANCE_API__PROT"]
    assert "unknown setting" in found["APPLIANCE_NOSECTION"]
    assert "unknown setting" in found["APPLIANCE_CONFIGG"]
    assert "valid integer" in found["api.port"]
    # The key and the variable that set it: the admin looks in the environment, not the file.
    assert found["api.port"].endswith("(set by APPLIANCE_API__PORT)")
    assert found["APPLIANCE_API__PROT"].endswith("(did you mean APPLIANCE_API__PORT?)")
    assert found["APPLIANCE_CONFIGG"].endswith("(did you mean APPLIANCE_CONFIG?)")
    assert "did you mean" not in found["APPLIANCE_NOSECTION"]


def test_env_value_errors_name_the_variable_for_lists_and_secret_files(
    cfg: Any, tmp_path: Path
) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://u:pw@db:notaport/app\n")
    found = problems(
        cfg({"api": {"workers": "many"}}),
        {
            "APPLIANCE_APPLIANCE__ROLES": "api,mailer",
            "APPLIANCE_POSTGRES__DSN__FILE": str(secret),
        },
    )
    assert found["appliance.roles.1"].endswith("(set by APPLIANCE_APPLIANCE__ROLES)")
    assert found["postgres.dsn"].endswith("(set by APPLIANCE_POSTGRES__DSN__FILE)")
    # A bad value from the TOML names no variable.
    assert "set by" not in found["api.workers"]


def test_misspelled_toml_keys_get_a_suggestion(cfg: Any) -> None:
    found = problems(
        cfg(
            {
                "api": {"prot": 1},
                "postgress": {"dsn": "postgresql://u@db/app"},
                "postgres": {"dsn_flie": "/run/secrets/dsn"},
                "schedules": {"prune_job_lg": {"cron": "* * * * *"}},
                "realtime": {"zzzz": 1},
            }
        )
    )
    assert found["api.prot"] == "unknown key (did you mean port?)"
    assert found["postgress"] == "unknown key (did you mean postgres?)"
    assert found["postgres.dsn_flie"] == "unknown key (did you mean dsn_file?)"
    assert found["schedules.prune_job_lg"] == "unknown key (did you mean prune_job_log?)"
    assert found["realtime.zzzz"] == "unknown key"


def test_reserved_variables_are_not_settings(cfg: Any) -> None:
    load_config(cfg({}), {"APPLIANCE_CONFIG": "/x", "APPLIANCE_SKIP_MIGRATIONS": "1"})


def test_secret_from_toml_file_key(cfg: Any, tmp_path: Path) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://u:s3cret@h/db\n")
    config = load_config(cfg({"postgres": {"dsn_file": str(secret)}}), {})
    assert config.postgres.dsn.get_secret_value() == "postgresql://u:s3cret@h/db"


def test_secret_from_env_file_variable_overrides_toml(cfg: Any, tmp_path: Path) -> None:
    secret = tmp_path / "s3"
    secret.write_text("from-file")
    path = cfg({"s3": {"access_key_id": "k", "secret_access_key": "in-toml"}})
    config = load_config(path, {"APPLIANCE_S3__SECRET_ACCESS_KEY__FILE": str(secret)})
    assert config.s3.secret_access_key is not None
    assert config.s3.secret_access_key.get_secret_value() == "from-file"


def test_secret_value_and_file_together_is_an_error(cfg: Any, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("t")
    found = problems(cfg({"api": {"metrics_token": "x", "metrics_token_file": str(secret)}}))
    assert "not both" in found["api.metrics_token"]
    found = problems(
        cfg({}),
        {"APPLIANCE_API__METRICS_TOKEN": "x", "APPLIANCE_API__METRICS_TOKEN__FILE": str(secret)},
    )
    assert "not both" in found["api.metrics_token"]


def test_unreadable_secret_file_is_named(cfg: Any, tmp_path: Path) -> None:
    found = problems(cfg({"redis": {"url_file": str(tmp_path / "missing")}}))
    assert "cannot read" in found["redis.url_file"]


def test_file_key_for_non_secret_is_unknown(cfg: Any, tmp_path: Path) -> None:
    found = problems(cfg({"api": {"port_file": str(tmp_path / "p")}}))
    assert found["api.port_file"] == "unknown key: only secrets may come from a file"


def test_errors_never_echo_secret_values(cfg: Any) -> None:
    path = cfg(
        {
            "postgres": {"dsn": "mysql://root:hunter2@db/x"},
            "s3": {"secret_access_key": "sekr1t-value"},
            "api": {"metrics_token": 12345},
        }
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    text = str(info.value)
    assert "postgres.dsn" in text
    assert "hunter2" not in text
    assert "sekr1t-value" not in text
    assert "12345" not in text


def test_redacted_hides_every_secret() -> None:
    config = Config.model_validate(
        {
            "postgres": {"dsn": "postgresql://app:pg-pass@db:5432/app"},
            "redis": {"url": "redis://:redis-p@ss@cache:6379/0"},
            "s3": {"access_key_id": "AKIA", "secret_access_key": "s3-pass"},
            "api": {"metrics_token": "metrics-pass"},
        }
    )
    shown = json.dumps(redacted(config))
    for secret in ("pg-pass", "redis-p", "ss@cache", "s3-pass", "metrics-pass"):
        assert secret not in shown
    plain = redacted(config)
    assert plain["postgres"]["dsn"] == "postgresql://app:***@db:5432/app"
    assert plain["redis"]["url"] == "redis://:***@cache:6379/0", "a raw @ in a password too"
    assert plain["s3"]["secret_access_key"] == "***"
    assert plain["api"]["metrics_token"] == "***"


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_config_check_exit_codes(cfg: Any) -> None:
    good = _cli("config", "check", env={"APPLIANCE_CONFIG": str(EXAMPLE)})
    assert good.returncode == 0, good.stderr
    bad_path = cfg({"api": {"port": "x", "nope": 1}})
    bad = _cli("config", "check", env={"APPLIANCE_CONFIG": str(bad_path), "APPLIANCE_XX": "1"})
    assert bad.returncode == 2
    assert "api.port" in bad.stderr
    assert "api.nope: unknown key" in bad.stderr
    assert "APPLIANCE_XX" in bad.stderr
    assert "3 problem(s)" in bad.stderr


def test_cli_config_show_redacts(cfg: Any) -> None:
    path = cfg(
        {
            "postgres": {"dsn": "postgresql://app:pg-pass@db/app"},
            "s3": {"access_key_id": "AKIA", "secret_access_key": "s3-pass"},
        }
    )
    shown = _cli("config", "show", env={"APPLIANCE_CONFIG": str(path)})
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["postgres"]["dsn"] == "postgresql://app:***@db/app"
    assert "pg-pass" not in shown.stdout
    assert "s3-pass" not in shown.stdout


def test_password_in_query_string_and_bad_dsn_never_shown(cfg: Any) -> None:
    config = Config.model_validate(
        {"postgres": {"dsn": "postgresql://u@db/app?password=q-secret&sslmode=require"}}
    )
    assert redacted(config)["postgres"]["dsn"] == (
        "postgresql://u@db/app?password=***&sslmode=require"
    )
    # libpq would quote the badly encoded password in its own error message.
    found = problems(cfg({"postgres": {"dsn": "postgresql://u:50%off@db/app"}}))
    assert "percent-encode" in found["postgres.dsn"]
    assert "50%off" not in " ".join(found.values())


def test_non_url_secret_fully_masked_even_with_scheme_like_text() -> None:
    config = Config.model_validate({"api": {"metrics_token": "x://y:z@w"}})
    assert redacted(config)["api"]["metrics_token"] == "***"


def test_empty_env_secret_switches_to_default_credential_chain(cfg: Any) -> None:
    path = cfg({"s3": {"access_key_id": "k", "secret_access_key": "baked"}})
    config = load_config(
        path, {"APPLIANCE_S3__ACCESS_KEY_ID": "", "APPLIANCE_S3__SECRET_ACCESS_KEY": ""}
    )
    assert config.s3.access_key_id == ""
    assert config.s3.secret_access_key is None


def test_realtime_and_idempotency_bounds_name_their_keys(cfg: Any) -> None:
    found = problems(cfg({"messages": {"idempotency_window": 0.0004}}))
    assert "greater than or equal to 1" in found["messages.idempotency_window"]
    found = problems(cfg({"realtime": {"ping_interval": 60, "presence_ttl": 5}}))
    assert "presence_ttl must be longer than ping_interval" in found["realtime"]


@pytest.mark.parametrize(
    ("section", "value", "rule"),
    [
        ("postgres.dsn", "postgresql://u:pw-secret@db:notaport/app", "port must be a number"),
        ("postgres.dsn", "postgresql://u:pw-secret@db:99999/app", "port must be a number"),
        ("postgres.dsn", "postgresql://u:pw-secret@h1:5432,h2:x/app", "port must be a number"),
        ("postgres.dsn", "postgresql://u:pw-secret@db/app?port=abc", "port must be a number"),
        ("redis.url", "redis://:pw-secret@cache:notaport/0", "port must be a number"),
        ("redis.url", "redis://:pw-secret@cache:70000/0", "port must be a number"),
        ("redis.url", "redis://:pw-secret@cache:6379/zero", "database number"),
        ("redis.url", "redis://:pw-secret@[::1:6379/0", "not a valid URL"),
        ("redis.url", "unix://", "socket's path"),
    ],
)
def test_dsn_and_redis_url_shape_checked_at_config_check(
    cfg: Any, section: str, value: str, rule: str
) -> None:
    """A bad port or shape fails `config check`, not the first connect; the value is never shown."""
    name, key = section.split(".")
    found = problems(cfg({name: {key: value}}))
    assert rule in found[section]
    assert "pw-secret" not in found[section]
    assert "notaport" not in found[section]


@pytest.mark.parametrize(
    ("section", "value"),
    [
        ("postgres.dsn", "postgresql://u@h1:5432,h2:5433/app"),
        ("postgres.dsn", "postgresql://u@[::1]:5432/app"),
        ("postgres.dsn", "postgresql:///app?host=/run/postgresql"),
        ("redis.url", "rediss://:pw@cache.example.com:6380/2"),
        ("redis.url", "redis://cache"),
        ("redis.url", "unix:///run/redis.sock?db=1"),
    ],
)
def test_valid_dsn_and_redis_url_shapes_pass(cfg: Any, section: str, value: str) -> None:
    name, key = section.split(".")
    config = load_config(cfg({name: {key: value}}), {})
    assert getattr(getattr(config, name), key).get_secret_value() == value


def test_cli_config_check_refuses_a_dsn_port_that_is_not_a_number(cfg: Any) -> None:
    path = cfg({"postgres": {"dsn": "postgresql://u@db:notaport/app"}})
    checked = _cli("config", "check", env={"APPLIANCE_CONFIG": str(path)})
    assert checked.returncode == 2
    assert "postgres.dsn: port must be a number from 1 to 65535" in checked.stderr
