import pytest

from raytp import accelerator
from raytp.accelerator import local_accelerator, select_xpu_backend
from raytp.errors import ConfigError


def test_bundles_per_device():
    assert accelerator.get("cpu").bundle(2) == {"CPU": 2.0}
    # Ray counts Intel GPUs and NVIDIA GPUs alike as "GPU".
    assert accelerator.get("xpu").bundle(4) == {"CPU": 4.0, "GPU": 1.0}
    assert accelerator.get("cuda").bundle(1) == {"CPU": 1.0, "GPU": 1.0}


def test_torch_device_uses_ray_visibility():
    assert accelerator.get("cpu").torch_device() == "cpu"
    assert accelerator.get("xpu").torch_device() == "xpu:0"
    assert accelerator.get("cuda").torch_device() == "cuda:0"


def test_backends():
    assert accelerator.get("cpu").backend() == "gloo"
    assert accelerator.get("cuda").backend() == "nccl"
    xpu = accelerator.get("xpu")
    assert xpu.backend(xccl_available=True, ccl_importable=True) == "xccl"
    assert xpu.backend(xccl_available=False, ccl_importable=True) == "ccl"
    with pytest.raises(ConfigError, match="oneccl_bind_pt"):
        xpu.backend(xccl_available=False, ccl_importable=False)


def test_select_xpu_backend_prefers_native_xccl():
    assert select_xpu_backend(True, False) == "xccl"


def test_default_dtypes():
    assert accelerator.get("cpu").default_dtype == "bfloat16"
    assert accelerator.get("xpu").default_dtype == "float16"
    assert accelerator.get("cuda").default_dtype == "float16"


def test_worker_env_cpu_sets_shm_allreduce_requirements():
    env = accelerator.get("cpu").worker_env(rank=1, world_size=2, master_addr="10.0.0.1", master_port=1234,
                                            num_threads=3)
    assert env["LOCAL_SIZE"] == "2" and env["LOCAL_RANK"] == "1" and env["RANK"] == "1"
    assert env["WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "1234"
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "3"
    assert not any(k.startswith("CCL_") for k in env)


def test_torch_extensions_dir_is_per_environment(monkeypatch):
    import sys

    from raytp.accelerator import torch_extensions_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert torch_extensions_dir().startswith(sys.prefix)
    env = accelerator.get("cpu").worker_env(rank=0, world_size=2, master_addr="h", master_port=1, num_threads=1)
    assert env["TORCH_EXTENSIONS_DIR"] == torch_extensions_dir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/x")
    assert torch_extensions_dir() == "/x"


def test_worker_env_xpu_has_ccl_settings():
    env = accelerator.get("xpu").worker_env(rank=0, world_size=4, master_addr="h", master_port=1, num_threads=1)
    assert env["DS_ACCELERATOR"] == "xpu"
    assert env["CCL_LOCAL_SIZE"] == "4" and env["CCL_LOCAL_RANK"] == "0"
    assert env["CCL_ZE_IPC_EXCHANGE"] == "sockets"


def test_worker_env_cuda():
    env = accelerator.get("cuda").worker_env(rank=0, world_size=2, master_addr="h", master_port=1, num_threads=1)
    assert env["DS_ACCELERATOR"] == "cuda" and "CCL_LOCAL_SIZE" not in env


def test_local_accelerator_order():
    assert local_accelerator(has=lambda d: d in ("xpu", "cuda")) == "xpu"
    assert local_accelerator(has=lambda d: d == "cuda") == "cuda"
    assert local_accelerator(has=lambda d: False) == "cpu"


def test_a_rank_without_its_device_fails_with_the_field_name():
    accelerator.get("cpu").check_available(has=lambda d: False)  # CPU ranks never lack a device
    accelerator.get("xpu").check_available(has=lambda d: d == "xpu")
    with pytest.raises(ConfigError, match="'device'.*xpu requested but torch sees no xpu"):
        accelerator.get("xpu").check_available(has=lambda d: False)


def test_unknown_device():
    with pytest.raises(ConfigError, match="unknown device"):
        accelerator.get("tpu")


def test_cpu_ranks_pin_to_their_own_cores_only_when_the_gang_fills_the_node():
    from raytp.accelerator import Accelerator

    assert Accelerator.rank_cpus(0, 2, 1, [0, 1]) == [0] and Accelerator.rank_cpus(1, 2, 1, [0, 1]) == [1]
    assert Accelerator.rank_cpus(1, 2, 2, [4, 5, 6, 7]) == [6, 7]  # the allowed set, not 0..n
    assert Accelerator.rank_cpus(0, 2, 1, [0, 1, 2, 3]) == []  # another gang may share the node: not pinned
