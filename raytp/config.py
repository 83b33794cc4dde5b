"""User-facing config (validated once, at the boundary) and the frozen config the gang runs on.

``RaytpConfig`` is what users write under ``args:`` in ``serve_config.yaml``.
``resolve()`` turns it into a ``ResolvedConfig``: the model is materialised (tiny
model generated if asked for), ``auto`` values are decided, and every check that
needs the model's own config (head counts, context length) runs here, so a bad
value fails at startup with one message naming the field and the fix.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from raytp import accelerator
from raytp.errors import ConfigError

# IPEX-LLM's low-bit formats that raytp passes through to ``optimize_model``.
LOW_BIT_FORMATS = (
    "sym_int4", "asym_int4", "sym_int5", "asym_int5", "sym_int8",
    "nf3", "nf4", "fp4", "fp6", "fp8", "fp8_e4m3", "fp8_e5m2", "fp16", "bf16",
)


class RaytpConfig(BaseModel):
    """What a user configures. Every field is documented; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field(
        "raytp-tiny-llama",
        description="Local Hugging Face checkpoint directory, a hub id (needs network), or one of the "
        "built-in random-weight models 'raytp-tiny-llama' / 'raytp-llama-0.5b' (generated locally on first use).",
    )
    served_model_name: str | None = Field(
        None, description="Name clients put in the OpenAI 'model' field. Defaults to 'model'."
    )
    tensor_parallel_size: int = Field(2, ge=1, le=64, description="Ranks (devices) per replica; one TP group per replica.")
    device: Literal["auto", "cpu", "xpu", "cuda"] = Field(
        "auto", description="'auto' picks xpu, then cuda, then cpu, by what torch sees on this node."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = float16 on xpu/cuda, bfloat16 on cpu (DeepSpeed's CPU accelerator rejects float16)."
    )
    low_bit: str | None = Field(
        None, description="IPEX-LLM low-bit weight format applied to each shard after AutoTP, e.g. 'sym_int4', "
        "'sym_int8', 'fp8'. Needs the 'ipex-llm' extra. null = no quantization.",
    )
    max_model_len: int | None = Field(
        None, ge=8, description="Longest prompt + completion in tokens. Defaults to the model's max_position_embeddings."
    )
    max_num_seqs: int = Field(8, ge=1, le=1024, description="Most sequences decoded together in one batch.")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Most prompt tokens prefilled in one engine step (a longer single prompt still runs "
        "alone), so new prompts cannot stall running streams for long.",
    )
    scheduling: Literal["continuous", "static"] = Field(
        "continuous", description="'continuous': iteration-level batching (requests join and leave every step). "
        "'static': upstream DeepSpeed's policy (a batch runs to completion before the next starts), for comparison.",
    )
    max_queue_size: int = Field(
        256, ge=1, description="Most requests waiting for a batch slot per replica; more are rejected (HTTP 429)."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped inside the checkpoint. Off by default: it executes arbitrary code."
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Ray placement strategy of a replica's bundles. STRICT_PACK keeps a TP group on one node."
    )
    num_cpus_per_worker: float = Field(
        1, gt=0, description="CPUs in each rank's bundle; also the rank's torch/OpenMP thread count on CPU."
    )
    worker_start_timeout_s: float = Field(600, gt=0, description="Longest a gang may take to start and load the model.")
    step_timeout_s: float = Field(
        60, gt=0, description="Longest one engine step (a collective across ranks) may take before the gang is declared dead."
    )
    api_key: str | None = Field(
        None, description="If set (or env RAYTP_API_KEY), every route but /health needs 'Authorization: Bearer <key>'."
    )
    seed: int = Field(0, description="Seed for requests that sample without a 'seed' of their own.")
    max_request_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest HTTP request body accepted; larger ones get 413 before being read.",
    )
    graceful_shutdown_timeout_s: float = Field(
        60, ge=0, description="On scale-down, redeploy or shutdown, how long a replica keeps serving its in-flight "
        "requests (new ones go to other replicas) before its gang is torn down.",
    )


@dataclass(frozen=True)
class ResolvedConfig:
    """The frozen config every layer below the boundary runs on. No 'auto' values remain."""

    model_path: str
    served_model_name: str
    tensor_parallel_size: int
    device: str
    dtype: str
    low_bit: str | None
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    scheduling: str
    max_queue_size: int
    trust_remote_code: bool
    placement_strategy: str
    num_cpus_per_worker: float
    worker_start_timeout_s: float
    step_timeout_s: float
    api_key: str | None
    seed: int
    max_request_body_bytes: int = 1_048_576
    graceful_shutdown_timeout_s: float = 60.0


def resolve(cfg: RaytpConfig | dict, *, check_devices: bool = True) -> ResolvedConfig:
    """Validate ``cfg`` against the model and this node; raise ``ConfigError`` naming the field on failure."""
    if isinstance(cfg, dict):
        cfg = RaytpConfig(**cfg)
    device = accelerator.resolve_device(cfg.device)
    if check_devices:
        accelerator.get(device).check_available(cfg.tensor_parallel_size)

    dtype = cfg.dtype if cfg.dtype != "auto" else accelerator.get(device).default_dtype
    if device == "cpu" and dtype == "float16":
        raise ConfigError("dtype", "float16 is not supported on cpu by DeepSpeed's CPU accelerator; use bfloat16 or float32.")

    if cfg.low_bit is not None:
        if cfg.low_bit not in LOW_BIT_FORMATS:
            raise ConfigError("low_bit", f"unknown format {cfg.low_bit!r}; choose one of {', '.join(LOW_BIT_FORMATS)} or null.")
        if importlib.util.find_spec("ipex_llm") is None:
            raise ConfigError("low_bit", "is set but ipex-llm is not installed; `pip install 'raytp[ipex-llm]'` or set low_bit: null.")

    model_path = _materialise_model(cfg.model)
    max_model_len = _check_model(cfg, model_path)
    return ResolvedConfig(
        model_path=model_path,
        served_model_name=cfg.served_model_name or cfg.model,
        tensor_parallel_size=cfg.tensor_parallel_size,
        device=device,
        dtype=dtype,
        low_bit=cfg.low_bit,
        max_model_len=max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        scheduling=cfg.scheduling,
        max_queue_size=cfg.max_queue_size,
        trust_remote_code=cfg.trust_remote_code,
        placement_strategy=cfg.placement_strategy,
        num_cpus_per_worker=cfg.num_cpus_per_worker,
        worker_start_timeout_s=cfg.worker_start_timeout_s,
        step_timeout_s=cfg.step_timeout_s,
        api_key=cfg.api_key or os.environ.get("RAYTP_API_KEY") or None,
        seed=cfg.seed,
        max_request_body_bytes=cfg.max_request_body_bytes,
        graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
    )


def _materialise_model(model: str) -> str:
    from raytp import tiny_model

    if model in tiny_model.PRESETS:
        return tiny_model.ensure(model)
    if os.path.isdir(model):
        return os.path.abspath(model)
    if model.startswith((".", "/", "~")):
        raise ConfigError("model", f"directory {model!r} does not exist; give a local checkpoint directory or a hub id.")
    return model  # a hub id: transformers resolves (and downloads) it


def _check_model(cfg: RaytpConfig, model_path: str) -> int:
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here is a config problem for the user
        raise ConfigError("model", f"cannot read a Hugging Face config from {model_path!r}: {e}") from e
    tp = cfg.tensor_parallel_size
    heads = getattr(hf, "num_attention_heads", None)
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    if heads is not None and (heads % tp or kv_heads % tp):
        raise ConfigError(
            "tensor_parallel_size",
            f"{tp} must divide the model's attention heads ({heads}) and key/value heads ({kv_heads}); "
            f"pick a divisor of {kv_heads}.",
        )
    limit = getattr(hf, "max_position_embeddings", None)
    if cfg.max_model_len is None:
        if limit is None:
            raise ConfigError("max_model_len", "the model config has no max_position_embeddings; set max_model_len.")
        return int(limit)
    if limit is not None and cfg.max_model_len > limit:
        raise ConfigError("max_model_len", f"{cfg.max_model_len} exceeds the model's max_position_embeddings ({limit}).")
    return cfg.max_model_len
