"""`neti-fast serve --replicas N` on Ray Serve: N model replicas behind one ingress, routed by concept.

    ray start --head && serve run neti_fast.serve.ray_app:app model=tiny replicas=2 concepts=DIR state_dir=DIR
    neti-fast serve --model ... --replicas 2           (the same, in one command, on a local Ray)

Two deployments (Ray comes with `pip install -e ".[ray]"`; nothing here imports it at module import):
  NetiIngress   takes every HTTP request from Ray Serve's proxy, computes a txt2img request's concept
                set (concepts.concept_key) and forwards the request, as bytes, to a replica with
                `.options(multiplexed_model_id=<concept set>)`: Ray Serve's multiplexing routes it to
                a replica that already served that set (its tables loaded, its conditionings in the
                engine's cache). It retries on another replica when one dies mid-request.
  NetiReplica   one `Server` (model, engine, batcher, concept store) and the very app `create_app`
                builds for the single-process server, called in-process as ASGI: every route, error
                and the API key behave as they do there. Each replica batches whatever concepts reach it.

State shared by replicas is the state folder (`state_dir`, on storage every node mounts): uploads
and trained concepts are files there, listed by each replica before its next request
(Server.sync_shared); a rescan of --concepts on one replica makes the others rescan; training
takes the folder's lock (one run at a time) and writes its status there (any replica answers it).

Routing is a hint, never a condition: every replica has every concept, and an image depends only
on its request (seed, prompt, concepts, settings), not on the replica or its batch-mates.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

from ..errors import NetiError

log = logging.getLogger("neti_fast.serve")

REPLICA_HEADER = "x-neti-replica"        # which replica answered (tests, logs, clients that care)
# A request whose replica died before answering is sent to another replica when it is a read or a
# txt2img (its answer is a function of the request); an upload or a training start is answered 503
# instead (the dead replica may have stored it already), so nothing is done twice.


def ray_missing() -> str | None:
    """None when Ray Serve is importable, else the one-line message naming the extra."""
    import importlib
    try:
        for name in ("ray", "ray.serve"):  # real imports: both are used right after anyway
            importlib.import_module(name)
    except ImportError:
        return '--replicas / --autoscale need Ray Serve: pip install -e ".[ray]"'
    return None


@dataclass
class RayConfig:
    replicas: int = 1
    autoscale: tuple[int, int] | None = None   # (min, max) replicas; None: a fixed `replicas`
    gpus_per_replica: float = 0.0              # 1 when the model runs on cuda
    cpus_per_replica: float = 1.0
    max_ongoing: int = 64                      # per replica: the batcher queues, so Ray need not hold them back
    concept_sets: int = 64                     # concept sets a replica advertises to the router (LRU)
    retries: int = 2                           # other replicas tried when one dies mid-request
    name: str = "neti-fast"                    # the Ray Serve application


def check_ray_config(rc: RayConfig) -> None:
    if rc.replicas < 1:
        raise NetiError("--replicas: must be at least 1")
    if rc.autoscale is not None:
        lo, hi = rc.autoscale
        if lo < 0 or hi < 1 or lo > hi:
            raise NetiError(f"--autoscale {lo} {hi}: give MIN MAX with 0 <= MIN <= MAX and MAX >= 1")


# ----------------------------------------------------------------------------- one HTTP exchange

@dataclass
class HttpCall:
    """An HTTP request as bytes: what the ingress hands a replica (Ray pickles it)."""
    method: str
    path: str
    query: bytes = b""
    headers: list = field(default_factory=list)   # [(bytes, bytes)], lower-case names as ASGI has them
    body: bytes = b""
    client: str = ""


@dataclass
class HttpReply:
    status: int
    headers: list
    body: bytes
    replica: str = ""
    hit: bool | None = None      # a keyed request: did this replica already hold its concept set


async def call_asgi(app, call: HttpCall) -> HttpReply:
    """Run one request through an ASGI app in this process. Cancelled (the client went away): the
    app sees http.disconnect, so the txt2img route cancels its batcher job, as under uvicorn."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": call.method,
             "scheme": "http", "path": call.path, "raw_path": call.path.encode(), "root_path": "",
             "query_string": call.query, "headers": call.headers, "client": (call.client, 0),
             "server": ("neti-fast-replica", 0)}
    gone = asyncio.Event()
    body_sent = False
    out = HttpReply(500, [], b"")
    chunks: list[bytes] = []

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        if msg["type"] == "http.response.start":
            out.status, out.headers = msg["status"], list(msg.get("headers", []))
        elif msg["type"] == "http.response.body":
            chunks.append(msg.get("body", b""))

    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        gone.set()
        await asyncio.wait({task}, timeout=5)
        raise
    except Exception:  # Starlette re-raises after its 500 answer has gone out: the answer stands
        if not chunks:
            raise
    out.body = b"".join(chunks)
    return out


def _error(status: int, message: str, field: str | None = None) -> HttpReply:
    """The app's error shape ({"error", "field"}: http.error_response), for what the ingress answers itself."""
    headers = [(b"content-type", b"application/json")] + ([(b"retry-after", b"5")] if status == 503 else [])
    return HttpReply(status, headers, json.dumps({"error": message, "field": field}).encode())


# ----------------------------------------------------------------------------- deployments

class NetiReplica:
    """A whole single-process server (Server + create_app) in one Ray Serve replica."""

    def __init__(self, cfg: dict, concept_sets: int = 64):
        from ray import serve

        from .app import Server, ServeConfig, create_app
        self.server = Server(ServeConfig(**cfg))
        self.app = create_app(self.server)
        ctx = serve.get_replica_context()
        self.id = ctx.replica_id.unique_id
        self.actor_name = ctx.replica_id.to_full_id_str()   # the Ray actor's name (namespace "serve")
        self.served: set[str] = set()         # concept sets this replica has served
        self.keyed = self.hits = self.loads = 0

        async def load(key: str) -> str:      # a closure: serve.multiplexed keeps its LRU on the function
            return await self._load(key)
        self._concepts = serve.multiplexed(max_num_models_per_replica=concept_sets)(load)

    async def _load(self, key: str) -> str:
        """Ray's multiplexed "model" is the concept set: its tables are loaded here (the store keeps
        them under its own budget); the engine caches their conditionings on first use."""
        self.loads += 1
        loop = asyncio.get_running_loop()
        for name in key.split(","):
            try:
                if name in self.server.store.entries:
                    await loop.run_in_executor(None, self.server.store.get, name)
            except NetiError:  # a file gone bad: the request itself gets the store's one-line error
                log.warning("concept %s: could not be loaded ahead of its request", name)
        return key

    def names(self) -> list[str]:
        self.server.sync_shared()
        return self.server.store.names()

    def info(self) -> dict:
        return {"replica": self.id, "actor": self.actor_name, "pid": os.getpid(), "keyed": self.keyed,
                "hits": self.hits, "loads": self.loads}

    async def serve_http(self, call: HttpCall) -> HttpReply:
        from ray import serve
        key = serve.get_multiplexed_model_id()
        hit = None
        if key:
            hit = key in self.served   # checked and added with no await between: one event loop
            self.served.add(key)
            self.keyed, self.hits = self.keyed + 1, self.hits + hit
            await self._concepts(key)
        await asyncio.get_running_loop().run_in_executor(None, self.server.sync_shared)
        reply = await call_asgi(self.app, call)
        if call.path == "/sdapi/v1/refresh-embeddings" and reply.status < 300:
            self.server.mark_refreshed()
        if call.path == "/health" and reply.status == 200:
            reply.body = json.dumps({**json.loads(reply.body), "replica": self.info()}).encode()
        reply.replica, reply.hit = self.id, hit
        return reply

    def __del__(self):  # Ray Serve calls it on a graceful shutdown: the batcher thread ends
        server = getattr(self, "server", None)
        if server is not None:
            server.close()


@dataclass
class RoutingStats:
    """Keyed txt2img requests as the ingress saw them: a hit when the replica already held the set."""
    requests: int = 0
    hits: int = 0
    by_key: dict = field(default_factory=dict)     # concept set -> {replica: requests}

    def add(self, key: str, reply: HttpReply) -> None:
        self.requests += 1
        self.hits += bool(reply.hit)
        per = self.by_key.setdefault(key, {})
        per[reply.replica] = per.get(reply.replica, 0) + 1

    def describe(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = round(self.hits / self.requests, 4) if self.requests else None
        return d


class NetiIngress:
    """Every HTTP request: its concept set computed, then forwarded to a replica that holds it."""

    def __init__(self, replicas, retries: int = 2, max_body_mb: int = 257, names_ttl_s: float = 2.0):
        self.replicas, self.retries, self.names_ttl = replicas, retries, names_ttl_s
        self.max_body = max_body_mb * 2**20   # a body is held whole here before a replica gets it
        self._names: list[str] = []
        self._names_at = 0.0
        self.routing = RoutingStats()
        self.retried = 0
        self.failed = 0

    async def _concept_names(self) -> list[str]:
        if time.monotonic() - self._names_at > self.names_ttl:
            try:
                self._names = await self.replicas.names.remote()
                self._names_at = time.monotonic()
            except Exception as e:  # a replica gone meanwhile: route on the names known so far
                log.warning("could not list the concepts (%s)", type(e).__name__)
        return self._names

    async def _route(self, call: HttpCall) -> tuple[str, bool]:
        """(the concept set of a txt2img body, "" for anything else; whether a replica's death may be
        answered by sending the call to another replica)."""
        from .concepts import concept_key
        if (call.method, call.path) != ("POST", "/sdapi/v1/txt2img"):
            return "", call.method in ("GET", "HEAD")
        try:
            body = json.loads(call.body or b"{}")
            prompt, concept = body.get("prompt", ""), body.get("concept")
        except (ValueError, AttributeError):
            return "", True   # the replica answers it 422
        # save_images: files the dead replica may have written already are not written twice
        retryable = body.get("save_images") is not True
        if not isinstance(prompt, str) or not (concept is None or isinstance(concept, str)):
            return "", retryable
        return concept_key(prompt, concept, await self._concept_names()), retryable

    async def forward(self, call: HttpCall) -> HttpReply:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        key, retryable = await self._route(call)
        handle = self.replicas.options(multiplexed_model_id=key) if key else self.replicas
        for attempt in range(self.retries + 1):
            try:
                reply = await handle.serve_http.remote(call)
                break
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                log.warning("a replica stopped during %s %s (%s)", call.method, call.path, type(e).__name__)
                if not retryable or attempt == self.retries:
                    self.failed += 1
                    return _error(503, "the replica serving this request stopped before answering; send it again"
                                  if not retryable else f"{attempt + 1} replicas stopped while serving this request")
                self.retried += 1
            except Exception as e:  # a bug in a replica outside the app's own handlers (traceback: its log)
                log.error("%s %s failed in a replica", call.method, call.path, exc_info=e)
                return _error(500, f"internal error ({type(e).__name__}); the replica's log has the details")
        if key:
            self.routing.add(key, reply)
        if call.path == "/health" and reply.status == 200:   # the cluster's view beside the replica's
            d = json.loads(reply.body)
            d.update(routing=self.routing.describe(), retried=self.retried, failed=self.failed)
            reply.body = json.dumps(d).encode()
        return reply

    async def __call__(self, request):
        from starlette.responses import Response
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                reply = _error(413, f"body: larger than this server's limit of {self.max_body // 2**20} MB", "body")
                break
            chunks.append(chunk)
        else:
            call = HttpCall(request.method, request.url.path, request.url.query.encode(),
                            [(k.lower(), v) for k, v in request.headers.raw], b"".join(chunks),
                            request.client.host if request.client else "")
            reply = await self.forward(call)
        resp = Response(reply.body, status_code=reply.status)
        resp.raw_headers = [(k, v) for k, v in reply.headers if k.lower() != b"content-length"] + \
            [(b"content-length", str(len(reply.body)).encode()), (REPLICA_HEADER.encode(), reply.replica.encode())]
        return resp


# ----------------------------------------------------------------------------- the application

def build(cfg, rc: RayConfig):
    """The Ray Serve application: `serve.run(build(cfg, rc))`. `cfg` is the single-process
    server's ServeConfig: each replica builds exactly that server."""
    from ray import serve

    from .app import check_config
    check_config(cfg)
    check_ray_config(rc)
    options = {"num_cpus": rc.cpus_per_replica}
    if rc.gpus_per_replica:
        options["num_gpus"] = rc.gpus_per_replica  # Ray sets CUDA_VISIBLE_DEVICES: each replica its GPU
    scale = {"num_replicas": rc.replicas} if rc.autoscale is None else {
        "autoscaling_config": {"min_replicas": rc.autoscale[0], "max_replicas": rc.autoscale[1],
                               "initial_replicas": max(rc.autoscale[0], 1),
                               # the batcher packs a replica's queue: scale on images waiting, not 1-2 requests
                               "target_ongoing_requests": max(2, cfg.max_batch // 2)}}
    replica = serve.deployment(NetiReplica, name="NetiReplica", ray_actor_options=options,
                               max_ongoing_requests=rc.max_ongoing, graceful_shutdown_timeout_s=30,
                               health_check_period_s=2, health_check_timeout_s=30, **scale)
    ingress = serve.deployment(NetiIngress, name="NetiIngress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=max(1000, rc.max_ongoing * 4))
    from .training import MAX_IMAGE_BYTES, MAX_IMAGES
    max_body_mb = max(cfg.max_upload_mb, MAX_IMAGES * MAX_IMAGE_BYTES // 2**20) + 1  # + the form's own bytes
    return ingress.bind(replica.bind(asdict(cfg), rc.concept_sets), rc.retries, max_body_mb)


def app(args: dict):
    """`serve run neti_fast.serve.ray_app:app key=value ...` (or a Serve config file's
    `import_path: neti_fast.serve.ray_app:app` with `args:`): ServeConfig's fields, plus replicas,
    autoscale ("MIN MAX"), gpus_per_replica, cpus_per_replica."""
    from .app import ServeConfig
    args = dict(args)
    rc = RayConfig()
    for k in ("replicas", "concept_sets", "retries", "max_ongoing"):
        if k in args:
            setattr(rc, k, int(args.pop(k)))
    for k in ("gpus_per_replica", "cpus_per_replica"):
        if k in args:
            setattr(rc, k, float(args.pop(k)))
    if "autoscale" in args:
        lo, hi = (int(x) for x in str(args.pop("autoscale")).replace(",", " ").split())
        rc.autoscale = (lo, hi)
    fields = ServeConfig.__dataclass_fields__
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise NetiError(f"{unknown[0]}: not a neti-fast serve setting (have: {', '.join(fields)}, replicas, autoscale, "
                        "gpus_per_replica, cpus_per_replica)")
    defaults = ServeConfig()

    def coerce(k, v):
        d = getattr(defaults, k)
        if isinstance(d, bool) and isinstance(v, str):  # bool("false") is True
            if v.lower() not in ("true", "false", "1", "0"):
                raise NetiError(f"{k} {v!r}: must be true or false")
            return v.lower() in ("true", "1")
        return v if d is None else type(d)(v)
    cfg = ServeConfig(**{k: coerce(k, v) for k, v in args.items()})
    if cfg.device.startswith("cuda") and "gpus_per_replica" not in args:
        rc.gpus_per_replica = 1.0
    return build(cfg, rc)


def run(cfg, rc: RayConfig, blocking: bool = True):
    """`neti-fast serve --replicas N`: a local Ray (or the cluster RAY_ADDRESS names), the app on
    cfg.host:cfg.port through Ray Serve's proxy."""
    import ray
    from ray import serve
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k.startswith("NETI_FAST_") or k in ("PYTHONPATH", "HF_HOME")}})
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build(cfg, rc), name=rc.name, route_prefix="/", blocking=blocking)
