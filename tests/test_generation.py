"""What does not need the model: config parsing, sampling, segments, and quiet loading."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from jmoshi_cli.errors import CacheError
from jmoshi_cli.infer.generation import ModelConfig, captured_output, loading_failed, read_config, segment_bounds


def test_captured_output_keeps_prints_warnings_and_logs(capsys):
    with captured_output(quiet=True) as out:
        print("printed")
        warnings.warn("warned", UserWarning, stacklevel=1)
        logging.getLogger("some.library").warning("logged")
    assert capsys.readouterr() == ("", "")
    assert all(word in out.getvalue() for word in ("printed", "warned", "logged"))
    assert not any(isinstance(h, logging.StreamHandler) and h.stream is out for h in logging.getLogger().handlers)


def test_captured_output_lets_everything_through_when_not_quiet(capsys, caplog):
    with pytest.warns(UserWarning, match="warned"), captured_output(quiet=False) as out:
        print("printed")
        warnings.warn("warned", UserWarning, stacklevel=1)
        logging.getLogger("some.library").warning("logged")
    assert capsys.readouterr().out == "printed\n"
    assert "logged" in caplog.text
    assert out.getvalue() == ""


def test_a_failed_load_carries_what_was_captured():
    captured = io.StringIO("The installed version of bitsandbytes was compiled without GPU support.\n")
    error = loading_failed(ValueError("header too large\nsecond line"), captured)
    assert isinstance(error, CacheError) and error.exit_code == 4
    assert error.message.splitlines()[0] == "cannot load the model: header too large"
    assert "compiled without GPU support" in error.message
    assert "output while loading" not in loading_failed(ValueError("x"), io.StringIO()).message


def test_read_config_like_moshi(tmp_path):
    assert read_config(None) == ModelConfig()
    path = tmp_path / "config.json"
    path.write_text('{"dim": 64, "moshi_name": "m.safetensors", "model_type": "moshi", "lm_gen_config": {"temp": 0.5}}')
    config = read_config(path)
    assert (config.lm_config, config.model_type, config.lm_gen_config) == ({"dim": 64}, "moshi", {"temp": 0.5})
    assert config.raw["moshi_name"] == "m.safetensors"
    path.write_text("[1, 2]")
    with pytest.raises(CacheError, match="not a JSON object"):
        read_config(path)
    with pytest.raises(CacheError, match="not found"):
        read_config(tmp_path / "missing.json")


def test_segment_bounds():
    assert segment_bounds(19, 8) == [(0, 8), (8, 16), (16, 19)]
    assert segment_bounds(8, 8) == [(0, 8)]
    assert segment_bounds(5, None) == [(0, 5)]
