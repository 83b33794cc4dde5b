"""The application builder named in serve_config.yaml: ``import_path: raytp.serve.app:build_app``.

``build_app(args)`` validates ``args`` with checks that need no node (``RaytpConfig``), decides
the device kind of the placement bundles (``raytp.config.bundle_device``), and binds the ingress
to one server deployment whose replicas each own a placement group of ``tensor_parallel_size``
bundles; with ``ingress: in_server``, one deployment named ``LLMServer`` whose replicas are both (the
ingress's routes over a server in the same process). Everything that depends on a node (model files,
HF config, device presence, ``auto`` dtype) is resolved later, in each replica. Deployment options in
serve_config.yaml's ``deployments:`` section (num_replicas, autoscaling_config, ...) override these
defaults by deployment name: ``LLMServer`` and (``ingress: separate``) ``OpenAIIngress``.
"""

from __future__ import annotations

from ray import serve

from raytp import platforms
from raytp.config import RaytpConfig, bundle_device, check_dtype_on
from raytp.serve.ingress import OpenAIIngress
from raytp.serve.local_server import InServer
from raytp.serve.server import LLMServer

# Updates that lose nothing: a changed config's replicas start beside the old ones, which keep serving until the
# new ones are running (loaded and warmed up), then drain their in-flight requests and stop. Serve's default (0)
# stops the old replica first: its clients would see 503s while the new one loads. This needs room for one more
# TP group per replica during an update (Serve waits for it while the old ones serve); on a node without that
# room set max_surge_percent: 0 in serve_config.yaml's deployments (docs/operations.md).
SURGE_PERCENT = 100


def server_deployment(cfg: RaytpConfig, device: str, cls=LLMServer):
    """The ``LLMServer`` deployment with one bundle per rank (of ``cls``: the server, or with ``ingress:
    in_server`` the ingress that holds it)."""
    bundle = platforms.get(device).bundle(cfg.num_cpus_per_worker)
    max_num_seqs, _ = cfg.scheduling_limits(device)
    return serve.deployment(
        cls,
        name="LLMServer",
        placement_group_bundles=[bundle] * cfg.tensor_parallel_size,
        placement_group_strategy=cfg.placement_strategy,
        # The replica actor lives in bundle 0 beside rank 0: it must take none of the rank's CPU.
        ray_actor_options={"num_cpus": 0},
        # Admission: the replica's own bounded queue is the precise bound (429 once max_queue_size requests wait).
        # Serve may hand a replica more than that, so its rejections are immediate; Serve's queue in front of the
        # replicas is only a backstop against floods (a burst is queued there before routing, so a tight bound
        # would reject requests the replica could still take), also answered with 429 (BackPressureError).
        max_ongoing_requests=max_num_seqs + 2 * cfg.max_queue_size,
        max_queued_requests=4 * (max_num_seqs + cfg.max_queue_size),
        # A replica whose gang dies exits by itself (server.py); the health check catches the rest (a stalled loop).
        health_check_period_s=2,
        health_check_timeout_s=30,
        # Drain: a stopping replica gets no new requests and keeps serving its in-flight ones this long.
        graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        # A replica that cannot start (bad weights, out of memory, a config its node cannot run) fails the
        # deployment with its error after a few tries instead of restarting for minutes.
        max_constructor_retry_count=3,
        max_surge_percent=SURGE_PERCENT,
        **routing_options(cfg),
    )


def routing_options(cfg: RaytpConfig) -> dict:
    """The server deployment's request router: prefix-aware (``raytp.serve.routing``) unless turned off."""
    if not cfg.prefix_routing:
        return {}
    from ray.serve.config import RequestRouterConfig

    from raytp.serve.routing import PrefixAffinityRouter

    return {"request_router_config": RequestRouterConfig(
        request_router_class=PrefixAffinityRouter,
        request_router_kwargs={"imbalance_margin": cfg.prefix_routing_margin})}


def build_app(args: dict | None = None):
    """Validate ``args`` (a ``RaytpConfig`` dict) and return the bound Serve application."""
    return bind_app(RaytpConfig(**(args or {})))


def bind_app(cfg: RaytpConfig | dict, engine_factory=None, server_options: dict | None = None):
    """Bind the application for ``cfg`` (Python users and tests).

    ``server_options``: Serve deployment options for ``LLMServer`` (e.g. ``num_replicas``,
    ``autoscaling_config``), as serve_config.yaml's ``deployments:`` gives them.
    ``engine_factory(config, tokenizer, stats)`` replaces the engine (``raytp.testing``, custom engines).
    """
    cfg = (RaytpConfig(**cfg) if isinstance(cfg, dict) else cfg).check_static()
    device = bundle_device(cfg.device)
    check_dtype_on(device, cfg.dtype)  # 'auto' may have become cpu: fail here, not in every replica
    if cfg.ingress == "in_server":  # one deployment: each replica answers HTTP and runs its own gang
        return server_deployment(cfg, device, OpenAIIngress).options(**(server_options or {})).bind(
            InServer(cfg.for_server(), device, engine_factory), cfg.api_key, cfg.max_request_body_bytes)
    server = server_deployment(cfg, device).options(**(server_options or {})).bind(
        cfg.for_server(), device, engine_factory)
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1000,
                               graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
                               graceful_shutdown_wait_loop_s=0.5, max_surge_percent=SURGE_PERCENT)
    return ingress.bind(server, cfg.api_key, cfg.max_request_body_bytes)
