import os

import pytest

from raytp import platforms
from raytp.errors import ConfigError
from raytp.platforms import local_accelerator, select_xpu_backend


def test_bundles_per_device():
    assert platforms.get("cpu").bundle(2) == {"CPU": 2.0}
    # Ray counts Intel GPUs and NVIDIA GPUs alike as "GPU".
    assert platforms.get("xpu").bundle(4) == {"CPU": 4.0, "GPU": 1.0}
    assert platforms.get("cuda").bundle(1) == {"CPU": 1.0, "GPU": 1.0}


def test_torch_device_uses_ray_visibility():
    assert platforms.get("cpu").torch_device() == "cpu"
    assert platforms.get("xpu").torch_device() == "xpu:0"
    assert platforms.get("cuda").torch_device() == "cuda:0"


def test_backends():
    assert platforms.get("cpu").backend() == "gloo"
    assert platforms.get("cuda").backend() == "nccl"
    xpu = platforms.get("xpu")
    assert xpu.backend(xccl_available=True, ccl_importable=True) == "xccl"
    assert xpu.backend(xccl_available=False, ccl_importable=True) == "ccl"
    with pytest.raises(ConfigError, match="oneccl_bind_pt"):
        xpu.backend(xccl_available=False, ccl_importable=False)


def test_select_xpu_backend_prefers_native_xccl():
    assert select_xpu_backend(True, False) == "xccl"


def test_auto_dtype_per_device():
    """'auto' is float16 on accelerators; on a CPU bfloat16 only where it computes bf16 natively."""
    assert platforms.get("xpu").resolve_dtype("auto") == "float16"
    assert platforms.get("cuda").resolve_dtype("auto") == "float16"
    assert platforms.get("cpu").resolve_dtype("auto", native_bf16=lambda: True) == "bfloat16"
    assert platforms.get("cpu").resolve_dtype("auto", native_bf16=lambda: False) == "float32"
    assert platforms.get("cuda").resolve_dtype("bfloat16") == "bfloat16"


def test_worker_env_cpu_sets_shm_allreduce_requirements():
    env = platforms.get("cpu").worker_env(rank=1, world_size=2, master_addr="10.0.0.1", master_port=1234,
                                            num_threads=3)
    assert env["LOCAL_SIZE"] == "2" and env["LOCAL_RANK"] == "1" and env["RANK"] == "1"
    assert env["WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "1234"
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "3"
    assert not any(k.startswith("CCL_") for k in env)


def test_torch_extensions_dir_is_per_environment(monkeypatch):
    import sys

    from raytp.platforms import torch_extensions_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert torch_extensions_dir().startswith(sys.prefix)
    env = platforms.get("cpu").worker_env(rank=0, world_size=2, master_addr="h", master_port=1, num_threads=1)
    assert env["TORCH_EXTENSIONS_DIR"] == torch_extensions_dir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/x")
    assert torch_extensions_dir() == "/x"


def test_worker_env_xpu_has_ccl_settings():
    env = platforms.get("xpu").worker_env(rank=0, world_size=4, master_addr="h", master_port=1, num_threads=1)
    assert env["DS_ACCELERATOR"] == "xpu"
    assert env["CCL_LOCAL_SIZE"] == "4" and env["CCL_LOCAL_RANK"] == "0"
    assert env["CCL_ZE_IPC_EXCHANGE"] == "sockets"


def test_worker_env_cuda():
    env = platforms.get("cuda").worker_env(rank=0, world_size=2, master_addr="h", master_port=1, num_threads=1)
    assert env["DS_ACCELERATOR"] == "cuda" and "CCL_LOCAL_SIZE" not in env


def test_local_accelerator_order():
    assert local_accelerator(has=lambda d: d in ("xpu", "cuda")) == "xpu"
    assert local_accelerator(has=lambda d: d == "cuda") == "cuda"
    assert local_accelerator(has=lambda d: False) == "cpu"


def test_a_rank_without_its_device_fails_with_the_field_name():
    platforms.get("cpu").check_available(has=lambda d: False)  # CPU ranks never lack a device
    platforms.get("xpu").check_available(has=lambda d: d == "xpu")
    with pytest.raises(ConfigError, match="'device'.*xpu requested but torch sees no xpu"):
        platforms.get("xpu").check_available(has=lambda d: False)


def test_unknown_device():
    with pytest.raises(ConfigError, match="unknown device"):
        platforms.get("tpu")


def test_cpu_ranks_pin_to_their_own_cores_only_when_the_gang_fills_the_node():
    cpu = platforms.get("cpu")
    assert cpu.rank_cpus(0, 2, 1, [0, 1]) == [0] and cpu.rank_cpus(1, 2, 1, [0, 1]) == [1]
    assert cpu.rank_cpus(1, 2, 2, [4, 5, 6, 7]) == [6, 7]  # the allowed set, not 0..n
    assert cpu.rank_cpus(0, 2, 1, [0, 1, 2, 3]) == []  # another gang may share the node: not pinned


def test_attention_backend_auto_is_triton_where_it_compiles_and_is_installed(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ("cuda", "xpu"):
        assert platforms.get(name).attention_backend("auto", triton_importable=True) == "triton"
        assert platforms.get(name).attention_backend("auto", triton_importable=False) == "sdpa"
        assert platforms.get(name).attention_backend("sdpa", triton_importable=True) == "sdpa"
    assert platforms.get("cpu").attention_backend("auto", triton_importable=True) == "sdpa"
    with pytest.raises(ConfigError, match="attention_backend.*Triton has no cpu backend"):
        platforms.get("cpu").attention_backend("triton", triton_importable=True)
    with pytest.raises(ConfigError, match="attention_backend.*triton is not installed"):
        platforms.get("cuda").attention_backend("triton", triton_importable=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs it on CPU tensors (tests)
    assert platforms.get("cpu").attention_backend("triton", triton_importable=True) == "triton"


def test_int4_is_packed_by_each_devices_own_kernel():
    pytest.importorskip("torchao")
    assert type(platforms.get("cpu").int4_config(32)).__name__ == "PrototypeInt4WeightOnlyConfig"
    assert platforms.get("cuda").int4_config(32).int4_packing_format == "tile_packed_to_4d"
    assert platforms.get("xpu").int4_config(32).int4_packing_format == "plain_int32"


def test_ranks_cache_compiled_graphs_in_raytps_dir_unless_the_user_chose_another(monkeypatch, tmp_path):
    """Inductor writes TORCHINDUCTOR_CACHE_DIR (its /tmp default) into the environment the first time it looks
    for its cache, and Ray's workers inherit it: that value must not move the ranks' cache between starts."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from raytp.platforms.base import inductor_cache_dir

    monkeypatch.setenv("RAYTP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert inductor_cache_dir() == str(tmp_path / "inductor")
    cache_dir()  # as saving a model does: Inductor sets the variable to its default
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert inductor_cache_dir() == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache_dir() == str(tmp_path / "mine")
