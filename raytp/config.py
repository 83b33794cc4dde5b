"""User-facing config, checked in two places: where the app is built and where its replica runs.

``RaytpConfig`` is what users write under ``args:`` in ``serve_config.yaml``. It is validated
where the application is built (often the head node of a cluster, which may have no
accelerator and no model files) with checks that need no node: types, ranges, names.
``bundle_device`` decides the device kind the placement bundles ask for (the rule for
``device: auto`` is in its docstring).

``resolve(cfg, device)`` runs in the replica, on the node of rank 0, before the gang starts:
it materialises the checkpoint, reads its HF config (head counts, context length) and
picks ``dtype: auto`` from this node's hardware, returning the frozen ``ResolvedConfig``
every layer below the server runs on. Whether torch sees the device is checked by each
rank, which is the only process Ray gives the device to. Every failure is a
``ConfigError`` naming the field and the fix.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from raytp import platforms
from raytp.errors import ConfigError

logger = logging.getLogger(__name__)

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
        description="Local Hugging Face checkpoint directory (on the nodes that run replicas), a hub id (needs "
        "network), or one of the built-in random-weight models 'raytp-tiny-llama' / 'raytp-llama-0.5b' (generated "
        "locally on first use).",
    )
    served_model_name: str | None = Field(
        None, description="Name clients put in the OpenAI 'model' field. Defaults to 'model'."
    )
    tensor_parallel_size: int = Field(
        2, ge=1, le=64, description="Ranks (devices) per replica; one TP group per replica."
    )
    device: Literal["auto", "cpu", "xpu", "cuda"] = Field(
        "auto", description="Device kind of every rank. 'auto': the accelerator torch sees where the app is built, "
        "else the one the Ray cluster advertises (GPU resources with an accelerator_type), else cpu. Set it "
        "explicitly on autoscaling clusters whose accelerator nodes may not exist yet when the app is deployed.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = float16 on xpu/cuda; on cpu bfloat16 where the CPU computes it natively "
        "(AVX512_BF16 or AMX), else float32 (bf16 matmuls are emulated and far slower there). float16 is not "
        "supported on cpu (DeepSpeed's CPU accelerator rejects it).",
    )
    low_bit: str | None = Field(
        None, description="IPEX-LLM low-bit weight format applied to each shard after AutoTP, e.g. 'sym_int4', "
        "'sym_int8', 'fp8'. Needs the 'ipex-llm' extra. null = no quantization.",
    )
    quantization: Literal["int4", "int8", "fp8"] | None = Field(
        None, description="torchao weight quantization of each rank's shard after AutoTP (linears only; lm_head and "
        "embeddings stay in dtype): 'int4' (weight-only, groupwise; the fastest decode, ~4x fewer weight bytes), "
        "'int8' (weight-only, per row; closest to bf16), 'fp8' (fp8 weights and activations; CUDA compute "
        "capability >= 8.9 only). Needs the 'torchao' extra; exclusive with low_bit. null = none.",
    )
    prepack_weights: bool = Field(
        True, description="cpu, without quantization or low_bit: reorder each linear's weight once "
        "into oneDNN's blocked layout at load (raytp/gang/linears.py); decode reads weights several times faster "
        "than torch's plain linear does. false: plain torch linears.",
    )
    cpu_linear_kernel: Literal["auto", "raytp", "onednn"] = Field(
        "auto", description="cpu, prepacked bfloat16 weights: whose kernel computes the linears. 'raytp': raytp's "
        "AVX-512 BF16 kernel over its own weight layout (raytp/gang/cpu_linear.py; decode reads weights 1.3-2x "
        "faster than oneDNN's, rows computed alike in any batch); 'onednn': oneDNN's matmul; 'auto': raytp's on "
        "CPUs with AVX512_BF16 and no AMX (each rank checks its own node), oneDNN's elsewhere.",
    )
    batch_invariant: bool = Field(
        False, description="A request's output does not depend on what else runs in its batch (greedy answers the "
        "same alone and under load, as vLLM's batch-invariant mode): every product is computed with the same "
        "shapes for a row wherever it sits in a step (one-row linears padded to two, prompt attention in fixed "
        "tiles). cpu only, with prepacked float32/bfloat16 weights (no quantization, low_bit or compile_model); "
        "costs a few percent of single-stream decode (docs/performance.md).",
    )
    quantize_lm_head: bool = Field(
        False, description="With quantization: the LM head too (int4/int8; for real vocabularies of 32k-150k tokens "
        "it is 15-30 % of the bytes read per decoded token). Off by default: the head is the layer most sensitive "
        "to quantization; check your model's quality with it.",
    )
    quantization_group_size: Literal[32, 64, 128, 256] | None = Field(
        None, description="int4 group size. null: the largest of 128/64/32 that divides every quantized linear's "
        "input width on a rank (a row-parallel shard has 1/tensor_parallel_size of it). Set it to compare TP sizes "
        "with identical quantization.",
    )
    max_model_len: int | None = Field(
        None, ge=8, description="Longest prompt + completion in tokens. Defaults to the model's "
        "max_position_embeddings.",
    )
    max_num_seqs: int | None = Field(
        None, ge=1, le=1024, description="Most sequences decoded together in one step. Requests are admitted while "
        "KV blocks are free, so this is a cap, not the usual limit. null: the device's default (256 on cuda/xpu, "
        "as vLLM's API server; 32 on cpu, measured: docs/performance.md).",
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Most tokens computed in one engine step: one per decoding sequence plus chunks of "
        "prompts being prefilled (a longer prompt is prefilled in chunks over several steps while the others keep "
        "decoding). Bounds a step's duration; must be at least max_num_seqs. null: the device's default (2048 on "
        "cuda/xpu, as vLLM's API server; 512 on cpu, where a step of 2048 prompt tokens takes seconds).",
    )
    block_size: int = Field(16, ge=1, le=256, description="Tokens per KV-cache block (the paged cache's page).")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV-cache budget of each rank, in bytes. null: 4 GiB per rank on cpu (vLLM's CPU "
        "default; pages are committed only as blocks are used); on xpu/cuda gpu_memory_utilization of the device's "
        "memory minus what the loaded shard uses, less a tenth of that for a step's activations.",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="xpu/cuda: fraction of device memory raytp may use (weights + KV cache) when "
        "kv_cache_memory_bytes is null.",
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV blocks of a cached identical prefix (system prompt, earlier chat turns): "
        "only the rest of a prompt is computed.",
    )
    enforce_eager: bool = Field(
        False, description="Run every step eagerly. Otherwise (the default), on one CUDA device, steps are "
        "captured as CUDA graphs at start-up and replayed: with the triton backend whole steps, mixed ones too (one "
        "graph per token-count bucket up to max_num_batched_tokens), with sdpa decode steps (one per batch-size and "
        "context-width bucket). The capture time is part of start-up and reported by /health; elsewhere steps are "
        "eager anyway.",
    )
    compile_model: bool | None = Field(
        None, description="Compile the model step once with torch.compile (Inductor) at start-up. cpu (sdpa): decode "
        "steps run one compiled graph with the paged attention inside it, prompt chunks run eagerly (batch-1 decode "
        "~1.2x; ~200 s of start-up for a 0.5B model on 2 cores, ~95 s when restarted with the graphs in Inductor's "
        "cache, RAYTP_CACHE_DIR/inductor). Other backends: every step one graph, attention an opaque op (cached "
        "there too). The compile time is reported by /health as "
        "ranks[].compile_s. null: the device's default (raytp/platforms). enforce_eager turns it off.",
    )
    attention_backend: Literal["auto", "sdpa", "triton"] = Field(
        "auto", description="Attention over the paged KV cache (raytp/gang/attention): 'triton' (one fused paged "
        "kernel per layer for every row of a step; CUDA and Intel XPU, whose torch builds bring Triton), 'sdpa' "
        "(torch's scaled_dot_product_attention per row or batch of decode rows; every device), 'auto' (triton on "
        "cuda/xpu when Triton is installed, else sdpa). Resolved on each rank and reported by /health.",
    )
    tool_call_parser: Literal["hermes"] | None = Field(
        None, description="How chat outputs with tool_choice auto are parsed into tool calls: 'hermes' "
        "(<tool_call>{...}</tool_call>: Qwen 2.5+, Hermes and many fine-tunes). null: detected from the chat "
        "template on the replica (one that renders calls in <tool_call> tags: hermes), and tool_choice auto is "
        "refused only when nothing is detected; required / a named function / none always work.",
    )
    scheduling: Literal["continuous", "static"] = Field(
        "continuous", description="'continuous': iteration-level batching (requests join and leave every step). "
        "'static': upstream DeepSpeed's policy (a batch runs to completion before the next starts), for comparison.",
    )
    async_scheduling: bool = Field(
        True, description="With 'continuous' scheduling: send step N + 1 to the ranks while step N runs (vLLM's "
        "async scheduling), so a rank never waits for the driver's round trip; outputs are the same as without it. "
        "A request with a grammar (structured output, forced tool calls) is scheduled every other step: its next "
        "mask needs the token before.",
    )
    stream_interval: int = Field(
        1, ge=1, le=256, description="Streamed responses: after the first token, the server hands a stream's "
        "chunks to the ingress (and the ingress to the HTTP proxy) in groups of at least this many (vLLM's "
        "--stream-interval). Each token is still its own SSE event; the events arrive in bursts. 1: every token as "
        "soon as it exists. Larger values cut the per-token work of Serve's two process hops, which on a small "
        "model with millisecond steps, or a busy CPU, bounds streamed throughput (docs/performance.md).",
    )
    ingress: Literal["separate", "in_server"] = Field(
        "separate", description="Where HTTP is answered. 'separate': an OpenAIIngress deployment in front of the "
        "LLMServer replicas (each streamed chunk crosses two Ray hops: server -> ingress -> HTTP proxy; requests "
        "that share a prompt prefix go to the same replica). 'in_server': the LLMServer replicas answer HTTP "
        "themselves, one deployment (one Ray hop per chunk, one process fewer per token: faster streaming where "
        "steps take milliseconds; with several replicas HTTP requests are routed by load only, not by prefix). "
        "serve_config.yaml's deployments: then lists only LLMServer.",
    )
    max_queue_size: int = Field(
        256, ge=1, description="Most requests waiting for a batch slot per replica; more are rejected (HTTP 429)."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped inside the checkpoint. Off by default: it executes arbitrary code."
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Ray placement strategy of a replica's bundles. STRICT_PACK keeps a TP group on "
        "one node.",
    )
    num_cpus_per_worker: float = Field(
        1, gt=0, description="CPUs in each rank's bundle; also the rank's torch/OpenMP thread count on CPU."
    )
    worker_start_timeout_s: float = Field(600, gt=0, description="Longest a gang may take to start and load the model.")
    step_timeout_s: float = Field(
        60, gt=0, description="Longest a rank may, while a step runs, leave a liveness ping unanswered (stopped, gone) "
        "or run no decoder layer (hung) before the gang is declared dead; a step itself may take as long as the "
        "hardware needs. Also the process group's timeout for one collective.",
    )
    api_key: str | None = Field(
        None, description="If set (or env RAYTP_API_KEY on the ingress's node), every route but /health, /ping "
        "and /version needs 'Authorization: Bearer <key>' (or 'x-api-key: <key>', as Anthropic's clients send it). "
        "Only the ingress ever sees it.",
    )
    seed: int = Field(0, description="Seed for requests that sample without a 'seed' of their own.")
    max_request_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest HTTP request body accepted; larger ones get 413 before being read.",
    )
    graceful_shutdown_timeout_s: float = Field(
        60, ge=0, description="On scale-down, redeploy or shutdown, how long a replica keeps serving its in-flight "
        "requests (new ones go to other replicas) before its gang is torn down.",
    )
    prefix_routing: bool = Field(
        True, description="With several replicas: send requests that share a prompt prefix (a conversation's turns, "
        "a completion prompt's first characters) to the same replica, whose prefix cache holds it "
        "(raytp/serve/routing.py); false: Serve's power of two choices.",
    )
    prefix_routing_margin: int = Field(
        4, ge=0, description="Prefix routing gives way to load balance when the preferred replica's queue is longer "
        "than the shortest by more than this many requests.",
    )

    def check_static(self) -> RaytpConfig:
        """Checks that need no node (run where the app is built); returns self. Raises ``ConfigError``."""
        check_dtype_on(self.device, self.dtype)
        self.scheduling_limits(None if self.device == "auto" else self.device)
        if self.low_bit is not None and self.low_bit not in LOW_BIT_FORMATS:
            raise ConfigError("low_bit", f"unknown format {self.low_bit!r}; choose one of "
                              f"{', '.join(LOW_BIT_FORMATS)} or null.")
        if self.quantization and self.low_bit:
            raise ConfigError("quantization", "and low_bit are both set: pick one weight format (torchao's "
                              "quantization, or IPEX-LLM's low_bit).")
        if self.quantize_lm_head and self.quantization not in ("int4", "int8"):
            raise ConfigError("quantize_lm_head", "needs quantization int4 or int8 (torchao).")
        check_quantization_on(self.device, self.quantization)
        if self.batch_invariant:
            if self.device not in ("auto", "cpu"):
                raise ConfigError("batch_invariant", _BATCH_INVARIANT_CPU_ONLY)
            if self.quantization or self.low_bit or self.compile_model or not self.prepack_weights:
                raise ConfigError("batch_invariant", "needs the prepacked float32/bfloat16 linears: set "
                                  "quantization and low_bit to null, compile_model to false and prepack_weights "
                                  "to true.")
        return self

    def scheduling_limits(self, device: str | None) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens) on ``device``: as configured, else the device kind's defaults
        (``Platform.default_max_num_seqs`` / ``default_max_num_batched_tokens``). ``ConfigError`` if a step could
        not hold a token for every running sequence."""
        if device is None:  # 'auto', where the app is built: only what is set can be checked
            seqs, tokens = self.max_num_seqs or 1, self.max_num_batched_tokens or 1 << 30
        else:
            platform = platforms.get(device)
            seqs = self.max_num_seqs or platform.default_max_num_seqs
            tokens = self.max_num_batched_tokens or max(platform.default_max_num_batched_tokens, seqs)
        if tokens < seqs:
            raise ConfigError("max_num_batched_tokens", f"{tokens} is less than max_num_seqs ({seqs}): every running "
                              "sequence needs a token each step.")
        return seqs, tokens

    def for_server(self) -> RaytpConfig:
        """The config the server replica gets: the API key stays in the ingress."""
        return self.model_copy(update={"api_key": None})


@dataclass(frozen=True)
class ResolvedConfig:
    """The frozen config the engine and the gang run on, resolved on the replica's node. No 'auto' remains."""

    model_path: str
    served_model_name: str
    tensor_parallel_size: int
    device: str
    dtype: str
    low_bit: str | None
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    kv_cache_memory_bytes: int | None
    gpu_memory_utilization: float
    enable_prefix_caching: bool
    scheduling: str
    max_queue_size: int
    trust_remote_code: bool
    placement_strategy: str
    num_cpus_per_worker: float
    worker_start_timeout_s: float
    step_timeout_s: float
    seed: int = 0
    quantization: str | None = None
    quantization_group_size: int | None = None
    quantize_lm_head: bool = False
    prepack_weights: bool = True
    cpu_linear_kernel: str = "auto"
    batch_invariant: bool = False
    stream_interval: int = 1
    enforce_eager: bool = False
    compile_model: bool | None = None
    tool_call_parser: str | None = None
    attention_backend: str = "auto"  # resolved on each rank (``Platform.attention_backend``)
    async_scheduling: bool = True


_BATCH_INVARIANT_CPU_ONLY = ("is implemented on cpu only (oneDNN's linears give a row the same bits in any batch "
                             "of two rows or more, and the sdpa backend computes each row alone); cuda/xpu need "
                             "batch-invariant matmul and attention kernels, which raytp does not have yet.")


def bundle_device(device: str, *, local=None, cluster_resources=None) -> str:
    """The device kind a replica's bundles ask for, decided where the app is built.

    An explicit ``device`` is used as is. ``auto``: the accelerator torch sees on this node (xpu, then cuda);
    else the one the Ray cluster advertises (``ray.cluster_resources()`` when Ray is initialised, or the
    ``cluster_resources`` given): GPUs whose ``accelerator_type:`` names an Intel GPU → xpu, any other typed
    GPU → cuda; GPUs with no type → ``ConfigError`` (set ``device``); no GPU at all → cpu."""
    if device != "auto":
        return device
    found = (local or platforms.local_accelerator)()
    if found != "cpu":
        return found
    if cluster_resources is None:
        import ray

        cluster_resources = ray.cluster_resources() if ray.is_initialized() else {}
    choice = platforms.device_from_cluster(cluster_resources)
    if choice == "cpu":
        logger.warning("raytp: device auto -> cpu: no accelerator on this node and none advertised by the Ray "
                       "cluster; set device explicitly if accelerator nodes are added later (autoscaling)")
    return choice


def resolve(cfg: RaytpConfig | dict, device: str | None = None, *, cpu_bf16=None) -> ResolvedConfig:
    """Resolve ``cfg`` on this node (the replica's, = rank 0's) for ``device`` (``bundle_device``'s choice).

    Raises ``ConfigError`` naming the field. ``cpu_bf16`` injects the native-bf16 probe (tests)."""
    if isinstance(cfg, dict):
        cfg = RaytpConfig(**cfg)
    cfg.check_static()
    device = device or bundle_device(cfg.device)
    check_quantization_on(device, cfg.quantization)  # again: an 'auto' device is known now
    if cfg.batch_invariant and device != "cpu":
        raise ConfigError("batch_invariant", _BATCH_INVARIANT_CPU_ONLY)
    platform = platforms.get(device)
    dtype = platform.quantized_dtype(cfg.quantization, cfg.dtype, platform.resolve_dtype(cfg.dtype, cpu_bf16))
    if cfg.quantization and importlib.util.find_spec("torchao") is None:
        raise ConfigError("quantization", "is set but torchao is not installed; `pip install 'raytp[torchao]'` "
                          "or set quantization: null.")
    if cfg.low_bit is not None and importlib.util.find_spec("ipex_llm") is None:
        raise ConfigError("low_bit", "is set but ipex-llm is not installed; `pip install 'raytp[ipex-llm]'` "
                          "or set low_bit: null.")
    max_num_seqs, max_num_batched_tokens = cfg.scheduling_limits(device)
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
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        block_size=cfg.block_size,
        kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enable_prefix_caching=cfg.enable_prefix_caching,
        scheduling=cfg.scheduling,
        max_queue_size=cfg.max_queue_size,
        trust_remote_code=cfg.trust_remote_code,
        placement_strategy=cfg.placement_strategy,
        num_cpus_per_worker=cfg.num_cpus_per_worker,
        worker_start_timeout_s=cfg.worker_start_timeout_s,
        step_timeout_s=cfg.step_timeout_s,
        seed=cfg.seed,
        quantization=cfg.quantization,
        quantization_group_size=cfg.quantization_group_size,
        quantize_lm_head=cfg.quantize_lm_head,
        prepack_weights=cfg.prepack_weights,
        cpu_linear_kernel=cfg.cpu_linear_kernel,
        batch_invariant=cfg.batch_invariant,
        stream_interval=cfg.stream_interval,
        enforce_eager=cfg.enforce_eager,
        compile_model=cfg.compile_model,
        tool_call_parser=cfg.tool_call_parser,
        attention_backend=cfg.attention_backend,
        async_scheduling=cfg.async_scheduling,
    )


def check_dtype_on(device: str, dtype: str) -> None:
    """``ConfigError`` for a dtype the device kind cannot run ('auto' passes)."""
    if device != "auto":
        platforms.get(device).check_dtype(dtype)


def check_quantization_on(device: str, quantization: str | None) -> None:
    """``ConfigError`` for a torchao format the device kind has no kernel for ('auto' passes: checked again once
    the device is known)."""
    if device != "auto":
        platforms.get(device).check_quantization(quantization)


def cpu_auto_dtype(native_bf16=None) -> str:
    """What ``dtype: auto`` means on this CPU: bfloat16 where it computes bf16 natively, else float32."""
    return platforms.get("cpu").resolve_dtype("auto", native_bf16)


def _materialise_model(model: str) -> str:
    from raytp import tiny_model

    if model in tiny_model.PRESETS:
        return tiny_model.ensure(model)
    if os.path.isdir(model):
        return os.path.abspath(model)
    if model.startswith((".", "/", "~")):
        raise ConfigError("model", f"directory {model!r} does not exist on this node; give a local checkpoint "
                          "directory (present on every node that runs replicas) or a hub id.")
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
        max_model_len = int(limit)
    elif limit is not None and cfg.max_model_len > limit:
        raise ConfigError("max_model_len",
                          f"{cfg.max_model_len} exceeds the model's max_position_embeddings ({limit}).")
    else:
        max_model_len = cfg.max_model_len
    _check_attention(hf, max_model_len)
    return max_model_len


def _check_attention(hf, max_model_len: int) -> None:
    """raytp's paged attention (``raytp.gang.attention``, every backend) is causal attention over the whole context:
    refuse models whose attention is something else, rather than answer wrongly."""
    window = getattr(hf, "sliding_window", None)
    if window and getattr(hf, "use_sliding_window", True) and max_model_len > window:
        raise ConfigError("max_model_len", f"{max_model_len} exceeds the model's sliding attention window ({window}); "
                          "raytp's paged attention attends to the whole context, which equals sliding-window "
                          f"attention only up to the window: set max_model_len <= {window}.")
    if getattr(hf, "attn_logit_softcapping", None):
        raise ConfigError("model", "attention logit soft-capping (e.g. Gemma 2) is not supported by raytp's paged "
                          "attention.")
