"""Settings as an operator meets them: one-line errors, honest flag names, warnings, help, logs."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest

from planbus import logs
from planbus.errors import ConfigurationError
from planbus.settings import FLAGS, Settings, load_settings, variables
from tests.test_listen_command import listen_env, run_listen

ISO_8601 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")


def run_planbus(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "planbus", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "command",
    [
        ["planbus.listen", "--log-level", "bogus"],
        ["planbus", "status", "--log-level", "bogus"],
        ["planbus.listen", "--concurrency", "many"],
    ],
)
def test_bad_flag_value_is_one_line_and_exit_2(command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *command],
        env=listen_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert len(lines(done.stderr)) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_log_level_is_case_insensitive() -> None:
    done = run_listen("--log-level", "debug", "--concurrency", "0", env=listen_env())
    assert done.returncode == 2
    assert "PLANBUS_CONCURRENCY" in done.stderr  # got past the flags to the settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PLANBUS_RETRY_BASE_SECONDS", "abc"), ("PLANBUS_POOL_SIZE", "0")],
)
def test_an_error_names_a_flag_the_worker_has(variable: str, value: str) -> None:
    flag = "--" + variable.removeprefix("PLANBUS_").lower().replace("_", "-")
    from_env = run_listen(env=listen_env(**{variable: value}))
    from_flag = run_listen(flag, value, env=listen_env())
    assert from_env.returncode == from_flag.returncode == 2
    assert f"{variable} ({flag})" in from_env.stderr
    assert "unrecognized arguments" not in from_flag.stderr
    assert flag in from_flag.stderr


def test_an_error_names_no_flag_the_command_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANBUS_POOL_SIZE", "0")
    # The operator commands have --database-url only.
    with pytest.raises(ConfigurationError) as raised:
        load_settings({"database_url": None})
    assert "PLANBUS_POOL_SIZE" in str(raised.value)
    assert "--pool-size" not in str(raised.value)


def test_unknown_planbus_variable_is_named_with_a_guess(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="planbus")
    load_settings({}, environ={"PLANBUS_CONCURENCY": "4", "PLANBUS_FROBNICATE": "1"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "PLANBUS_CONCURENCY (did you mean PLANBUS_CONCURRENCY?)" in warnings[0]
    assert "PLANBUS_FROBNICATE" in warnings[0]


def test_known_variables_raise_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    environ = {v: "1" for name in Settings.model_fields for v in variables(name)}
    load_settings({}, environ={**environ, "PLANBUS_TEST_DATABASE_URL": "x"})
    assert not [r for r in caplog.records if r.name == "planbus.settings"]


def test_unknown_variable_warning_reaches_the_worker_log() -> None:
    done = run_listen(
        "--database-url",
        "postgresql://nobody@127.0.0.1:1/x",
        env=listen_env(PLANBUS_CONCURENCY="4"),
    )
    assert "PLANBUS_CONCURENCY (did you mean PLANBUS_CONCURRENCY?)" in done.stderr


def test_a_lease_far_shorter_than_the_sweep_warns_with_the_recovery_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="planbus")
    settings = load_settings({"lease_seconds": 1, "sweep_seconds": 100}, environ={})
    assert settings.lease_seconds == 1  # accepted
    assert "lease + sweep = 101 s" in caplog.text
    caplog.clear()
    load_settings({}, environ={})  # the defaults: 8 s lease, 5 s sweep
    assert caplog.text == ""


def test_every_flag_has_help_with_default_variable_and_choices() -> None:
    done = run_listen("--help", env=listen_env())
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for name in FLAGS:
        flag = "--" + name.replace("_", "-")
        assert flag in text
        assert f"env: {' or '.join(variables(name))}" in text, name
    assert "default: 32; env: PLANBUS_CONCURRENCY" in text
    assert "choices: openai, template, auto" in text
    assert "DEBUG, INFO, WARNING, ERROR, CRITICAL (default: INFO)" in text


def record(message: str, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("planbus.test", logging.ERROR, __file__, 1, message, (), exc_info)  # type: ignore[arg-type]


def test_json_log_time_is_iso_8601_with_zone_and_errors_carry_the_exception() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        line = logs.JsonFormatter().format(record("it failed", sys.exc_info()))
    entry = json.loads(line)
    assert ISO_8601.match(entry["time"]), entry["time"]
    assert entry["message"] == "it failed"
    assert "RuntimeError: boom" in entry["exception"]
    assert "\n" not in line


def test_text_log_time_is_iso_8601() -> None:
    line = logs.TextFormatter(logs.TEXT_FORMAT).format(record("hello"))
    assert ISO_8601.match(line.split(" ", 1)[0]), line


def test_a_configuration_error_is_a_json_line_in_json_mode() -> None:
    done = run_listen("--log-format", "json", env=listen_env(PLANBUS_POOL_SIZE="0"))
    assert done.returncode == 2
    [line] = lines(done.stderr)
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert "PLANBUS_POOL_SIZE" in entry["message"]


def test_an_uncaught_exception_is_a_json_line_in_json_mode() -> None:
    code = "from planbus import logs; logs.configure('json'); raise RuntimeError('boom')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    [line] = lines(done.stderr)
    entry = json.loads(line)
    assert entry["level"] == "CRITICAL"
    assert "RuntimeError: boom" in entry["exception"]
