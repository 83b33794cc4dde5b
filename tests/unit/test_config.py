import importlib.util
import json

import pytest
from pydantic import ValidationError

from raytp import platforms
from raytp.config import RaytpConfig, bundle_device, resolve
from raytp.errors import ConfigError

NATIVE_BF16, NO_BF16 = (lambda: True), (lambda: False)


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
    r = resolve({"model": model_dir, "device": "cpu", "tensor_parallel_size": 4}, cpu_bf16=NATIVE_BF16)
    assert r.device == "cpu" and r.dtype == "bfloat16" and r.max_model_len == 512 and r.served_model_name == model_dir


def test_auto_dtype_on_cpu_follows_native_bf16(model_dir, caplog):
    caplog.set_level("INFO", logger="raytp.platforms.cpu")
    assert resolve({"model": model_dir, "device": "cpu"}, cpu_bf16=NATIVE_BF16).dtype == "bfloat16"
    assert resolve({"model": model_dir, "device": "cpu"}, cpu_bf16=NO_BF16).dtype == "float32"
    assert "dtype auto -> float32 (this CPU lacks native bf16" in caplog.text
    caplog.clear()
    assert resolve({"model": model_dir, "device": "cpu", "dtype": "bfloat16"}, cpu_bf16=NO_BF16).dtype == "bfloat16"
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "will be slow" in caplog.text
    assert resolve({"model": model_dir, "device": "cuda"}, cpu_bf16=NO_BF16).dtype == "float16"


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


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_quantize_lm_head_needs_int4_or_int8(model_dir, quantization):
    with pytest.raises(ConfigError, match="quantize_lm_head.*int4 or int8"):
        resolve({"model": model_dir, "device": "cuda", "quantization": quantization, "quantize_lm_head": True})


@pytest.mark.parametrize("extra,match", [
    ({"device": "cuda"}, "cpu only"),
    ({"device": "cpu", "quantization": "int8"}, "prepacked"),
    ({"device": "cpu", "compile_model": True}, "prepacked"),
    ({"device": "cpu", "prepack_weights": False}, "prepacked"),
])
def test_batch_invariant_where_it_holds_only(model_dir, extra, match):
    with pytest.raises(ConfigError, match=f"batch_invariant.*{match}"):
        resolve({"model": model_dir, "batch_invariant": True, **extra})


def test_batch_invariant_refused_when_auto_resolves_to_an_accelerator(model_dir):
    with pytest.raises(ConfigError, match="batch_invariant.*cpu only"):
        resolve({"model": model_dir, "batch_invariant": True}, device="xpu")


@pytest.mark.skipif(importlib.util.find_spec("ipex_llm") is not None, reason="ipex-llm is installed here")
def test_low_bit_needs_ipex_llm(model_dir):
    with pytest.raises(ConfigError, match="low_bit.*ipex-llm is not installed"):
        resolve({"model": model_dir, "device": "cpu", "low_bit": "sym_int4"})


def test_build_checks_touch_no_node(monkeypatch):
    """Building the app for a model directory and device that only the replicas' nodes have succeeds."""
    from raytp.serve.app import build_app

    def untouchable(*_a, **_k):
        raise AssertionError("the build node was probed")

    monkeypatch.setattr("raytp.config._materialise_model", untouchable)
    monkeypatch.setattr("raytp.platforms.torch_has", untouchable)
    app = build_app({"model": "/models/llama", "device": "xpu", "tensor_parallel_size": 2, "api_key": "k"})
    server = app._bound_deployment.init_args[0]._bound_deployment
    assert server._replica_config.placement_group_bundles == [{"CPU": 1.0, "GPU": 1.0}] * 2
    cfg, device, _ = server.init_args
    assert device == "xpu" and cfg.model == "/models/llama" and cfg.api_key is None  # the key stays in the ingress


def test_build_rejects_what_no_node_can_run():
    from raytp.serve.app import build_app

    with pytest.raises(ConfigError, match="dtype.*bfloat16 or float32"):
        build_app({"device": "cpu", "dtype": "float16"})
    with pytest.raises(ConfigError, match="low_bit.*unknown format"):
        build_app({"device": "cpu", "low_bit": "int3"})


@pytest.mark.parametrize("resources,expected", [
    ({"CPU": 16.0}, "cpu"),
    ({"CPU": 16.0, "GPU": 8.0, "accelerator_type:Intel-GPU-Max-1550": 1.0}, "xpu"),
    ({"CPU": 16.0, "GPU": 8.0, "accelerator_type:H100": 1.0}, "cuda"),
])
def test_auto_device_from_the_cluster_when_the_build_node_has_none(resources, expected):
    assert bundle_device("auto", local=lambda: "cpu", cluster_resources=resources) == expected
    assert bundle_device("auto", local=lambda: "xpu", cluster_resources=resources) == "xpu"  # this node's own
    assert bundle_device("cuda", local=lambda: "xpu", cluster_resources=resources) == "cuda"  # explicit wins


def test_auto_device_refuses_to_guess_untyped_gpus():
    with pytest.raises(ConfigError, match="'device'.*set device: xpu or device: cuda"):
        bundle_device("auto", local=lambda: "cpu", cluster_resources={"GPU": 2.0})


def test_auto_device_on_a_cluster_whose_gpus_are_on_another_node(monkeypatch):
    """The build runs where torch sees no accelerator; the Ray cluster advertises Intel GPUs on a worker node:
    the replicas' bundles ask for GPUs."""
    import ray

    from raytp.serve.app import build_app

    monkeypatch.setattr("raytp.platforms.local_accelerator", lambda: "cpu")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 6.0, "GPU": 2.0,
                                                           "accelerator_type:Intel-GPU-Max-1100": 1.0})
    server = build_app({"device": "auto", "tensor_parallel_size": 2})._bound_deployment.init_args[0]._bound_deployment
    assert server._replica_config.placement_group_bundles == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert server.init_args[1] == "xpu"


def test_config_errors_keep_their_field_across_ray():
    """A ConfigError raised in a rank or replica reaches the caller as itself, field and text intact."""
    from ray.exceptions import RayError, RayTaskError

    err = ConfigError("device", "xpu requested but torch sees no xpu device")
    back = RayError.from_bytes(RayTaskError("init_device", "traceback", err).to_bytes())
    assert isinstance(back.cause, ConfigError) and back.cause.field == "device" and str(back.cause) == str(err)


def test_kv_cache_and_step_budget_fields(model_dir):
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        RaytpConfig(max_num_seqs=32, max_num_batched_tokens=16).check_static()
    with pytest.raises(ValidationError):
        RaytpConfig(gpu_memory_utilization=1.5)
    r = resolve({"model": model_dir, "device": "cpu", "block_size": 32, "kv_cache_memory_bytes": 1 << 20,
                 "enable_prefix_caching": False}, cpu_bf16=NATIVE_BF16)
    assert (r.block_size, r.kv_cache_memory_bytes, r.enable_prefix_caching) == (32, 1 << 20, False)
    assert platforms.get("cpu").kv_cache_budget(None, 0.9) == 4 << 30
    assert platforms.get("cuda").kv_cache_budget(123, 0.9) == 123, "an explicit budget needs no device"


def test_attention_the_paged_kernel_cannot_compute_is_refused(tmp_path):
    from raytp.config import _check_attention

    class HF:
        sliding_window = 4096
        use_sliding_window = True

    with pytest.raises(ConfigError, match="max_model_len <= 4096"):
        _check_attention(HF(), 8192)
    _check_attention(HF(), 4096)  # within the window, full attention is exact
    HF.use_sliding_window = False  # Qwen2's switch: configured but off
    _check_attention(HF(), 32768)
    HF.attn_logit_softcapping = 50.0
    with pytest.raises(ConfigError, match="soft-capping"):
        _check_attention(HF(), 1024)


def test_quantization_formats_the_device_cannot_run_are_refused(model_dir):
    with pytest.raises(ConfigError, match="quantization.*fp8 has no torchao kernel on cpu"):
        RaytpConfig(device="cpu", quantization="fp8").check_static()
    with pytest.raises(ConfigError, match="quantization.*fp8 has no torchao kernel on xpu"):
        resolve({"model": model_dir, "device": "auto", "quantization": "fp8"}, "xpu")  # auto became xpu
    with pytest.raises(ConfigError, match="pick one weight format"):
        RaytpConfig(quantization="int4", low_bit="sym_int4").check_static()
    with pytest.raises(ConfigError, match="dtype.*tinygemm.*bfloat16 only"):
        resolve({"model": model_dir, "device": "cuda", "quantization": "int4", "dtype": "float16"})
    cuda = resolve({"model": model_dir, "device": "cuda", "quantization": "int4"})
    assert cuda.dtype == "bfloat16" and cuda.quantization == "int4"  # auto picks the kernel's dtype
    cpu = resolve({"model": model_dir, "device": "cpu", "quantization": "int8", "enforce_eager": True},
                  cpu_bf16=NATIVE_BF16)
    assert cpu.quantization == "int8" and cpu.enforce_eager


def test_int4_group_size_divides_every_shard_width():
    from raytp.gang.loader import group_size_for

    assert group_size_for([1024, 4096], None) == 128
    assert group_size_for([128, 64], None) == 64  # a TP=2 row-parallel shard of the tiny model
    assert group_size_for([128, 64], 32) == 32
    with pytest.raises(ConfigError, match="quantization_group_size.*no group size in \\(128,\\) divides"):
        group_size_for([128, 64], 128)


def test_graphs_only_where_they_are_verified():
    import torch

    cuda = platforms.get("cuda").graph_capture(False, 1)
    assert cuda.name == "cuda_graphs" and cuda.module is torch.cuda and cuda.graph_class == "CUDAGraph"
    assert platforms.get("cuda").graph_capture(True, 1) is None  # enforce_eager
    assert platforms.get("cuda").graph_capture(False, 2) is None
    assert platforms.get("cpu").graph_capture(False, 1) is None
    assert platforms.get("xpu").graph_capture(False, 1) is None


def test_scheduling_limits_default_per_device_kind(model_dir):
    """Admission is by free KV blocks: max_num_seqs is a cap, by default the device kind's (vLLM's API-server
    values on GPUs, a measured one on CPU); explicit values win; a step must hold a token per running sequence."""
    cpu = resolve({"model": model_dir, "device": "cpu"}, cpu_bf16=NATIVE_BF16)
    cuda = resolve({"model": model_dir, "device": "cuda"})
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (32, 512)
    assert (cuda.max_num_seqs, cuda.max_num_batched_tokens) == (256, 2048)
    mine = resolve({"model": model_dir, "device": "cpu", "max_num_seqs": 4, "max_num_batched_tokens": 64},
                   cpu_bf16=NATIVE_BF16)
    assert (mine.max_num_seqs, mine.max_num_batched_tokens) == (4, 64)
    big = resolve({"model": model_dir, "device": "cpu", "max_num_seqs": 1000}, cpu_bf16=NATIVE_BF16)
    assert big.max_num_batched_tokens == 1000  # the default grows to hold a token per sequence
    with pytest.raises(ConfigError, match="max_num_batched_tokens.*less than max_num_seqs"):
        RaytpConfig(device="cpu", max_num_batched_tokens=16).check_static()  # 16 < the cpu default of 32
