import importlib.util
import json

import pytest
from pydantic import ValidationError

from raytp.config import RaytpConfig, resolve
from raytp.errors import ConfigError


@pytest.fixture()
def model_dir(tmp_path):
    """A checkpoint directory with just a config: enough for every startup check."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 4,
        "hidden_size": 64, "max_position_embeddings": 512, "num_hidden_layers": 1,
    }))
    return str(tmp_path)


def test_defaults_are_safe():
    cfg = RaytpConfig()
    assert cfg.trust_remote_code is False
    assert cfg.tensor_parallel_size == 2 and cfg.placement_strategy == "STRICT_PACK" and cfg.low_bit is None
    assert all(f.description for f in RaytpConfig.model_fields.values()), "every field is documented"


def test_unknown_field_rejected():
    with pytest.raises(ValidationError, match="tensor_paralel_size"):
        RaytpConfig(tensor_paralel_size=2)


def test_resolve_cpu(model_dir):
    r = resolve({"model": model_dir, "device": "cpu", "tensor_parallel_size": 4})
    assert r.device == "cpu" and r.dtype == "bfloat16" and r.max_model_len == 512 and r.served_model_name == model_dir


def test_tp_must_divide_heads(model_dir):
    with pytest.raises(ConfigError, match="tensor_parallel_size.*key/value heads \\(4\\)"):
        resolve({"model": model_dir, "device": "cpu", "tensor_parallel_size": 8})
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        resolve({"model": model_dir, "device": "cpu", "tensor_parallel_size": 3})


def test_float16_rejected_on_cpu(model_dir):
    with pytest.raises(ConfigError, match="dtype.*bfloat16 or float32"):
        resolve({"model": model_dir, "device": "cpu", "dtype": "float16"})


def test_max_model_len_bounded_by_model(model_dir):
    with pytest.raises(ConfigError, match="max_model_len"):
        resolve({"model": model_dir, "device": "cpu", "max_model_len": 4096})
    assert resolve({"model": model_dir, "device": "cpu", "max_model_len": 128}).max_model_len == 128


def test_missing_checkpoint_dir():
    with pytest.raises(ConfigError, match="'model'.*does not exist"):
        resolve({"model": "/nonexistent/ckpt", "device": "cpu"})


def test_low_bit_unknown_format(model_dir):
    with pytest.raises(ConfigError, match="low_bit.*unknown format"):
        resolve({"model": model_dir, "device": "cpu", "low_bit": "int3"})


@pytest.mark.skipif(importlib.util.find_spec("ipex_llm") is not None, reason="ipex-llm is installed here")
def test_low_bit_needs_ipex_llm(model_dir):
    with pytest.raises(ConfigError, match="low_bit.*ipex-llm is not installed"):
        resolve({"model": model_dir, "device": "cpu", "low_bit": "sym_int4"})


def test_xpu_without_devices(model_dir):
    with pytest.raises(ConfigError, match="'device'"):
        resolve({"model": model_dir, "device": "xpu"})


def test_api_key_from_env(model_dir, monkeypatch):
    monkeypatch.setenv("RAYTP_API_KEY", "s3cret")
    assert resolve({"model": model_dir, "device": "cpu"}).api_key == "s3cret"
