"""`stride serve`'s flags come from the Settings fields, the one place a setting is declared: every
field is a flag named after it whose help names its env var and default; a bool is `--x` / `--no-x`;
a Literal gives the choices; a flag overrides the environment, which overrides the default."""
import argparse
import typing

import pytest

from stride_diffusion.service.cli import env_names, parser, settings_from
from stride_diffusion.service.settings import Settings


def actions() -> dict:
    return {a.dest: a for a in parser()._actions if a.dest not in ("help", "log_level")}


def test_every_setting_is_a_flag_and_nothing_else_is():
    acts = actions()
    assert set(acts) == set(Settings.model_fields)
    for name, a in acts.items():
        field = Settings.model_fields[name]
        assert "--" + name.replace("_", "-") in a.option_strings
        if (field.json_schema_extra or {}).get("hidden"):
            assert a.help == argparse.SUPPRESS
            continue
        assert a.help.startswith(field.description), name
        assert all(e in a.help for e in env_names(name)) and "default " in a.help, a.help
        if typing.get_origin(field.annotation) is typing.Literal:
            assert a.choices == list(typing.get_args(field.annotation))


def test_env_names_and_shown_defaults():
    assert env_names("max_batch") == ["STRIDE_MAX_BATCH"]
    assert env_names("redis_url") == ["REDIS_URL", "STRIDE_REDIS_URL"]
    acts = actions()
    assert "default 1,2,3,4,5,6,8,10,12,16]" in acts["steps"].help
    assert "default <hostname>-<pid>]" in acts["worker_id"].help
    assert acts["dtype"].choices == ["fp32", "bf16", "fp16", "fp8"]  # fp8: refused off sm_89+ (tests/solvers/test_fp8.py)
    assert acts["artifacts"].nargs == "+" and acts["port"].type is int and acts["max_wait_ms"].type is float


@pytest.mark.parametrize("name", ["warmup", "graphs"])
def test_bool_settings_turn_on_and_off(name, monkeypatch):
    flag = name.replace("_", "-")
    assert actions()[name].option_strings == [f"--{flag}", f"--no-{flag}"]
    assert getattr(settings_from(parser().parse_args([f"--no-{flag}"])), name) is False
    monkeypatch.setenv(f"STRIDE_{name.upper()}", "false")
    assert getattr(settings_from(parser().parse_args([])), name) is False  # the env var when no flag
    assert getattr(settings_from(parser().parse_args([f"--{flag}"])), name) is True  # the flag over it


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("STRIDE_MAX_BATCH", "8")
    monkeypatch.setenv("STRIDE_STEPS", "1,2")
    s = settings_from(parser().parse_args(["--steps", "2,4", "--artifacts", "a", "b"]))
    assert s.max_batch == 8 and s.steps == [2, 4] and s.artifacts == ["a", "b"]
