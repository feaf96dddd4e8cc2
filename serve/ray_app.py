"""pop-serve on a Ray cluster (Ray Serve): one deployment whose replicas each hold one PopSession and its
Engine (one copy of the weights per replica process), behind Ray Serve's HTTP proxy, with the same
OpenAI-compatible app as pop-serve (pop.serve.app), streaming included.

    serve run pop.serve.ray_app:build_app artifacts=/shared/artifacts/gemma3-270m-onnx-pop replicas=2

Every node must see the artifacts at the same path (a shared or replicated file system): replicas map
weights.bin from disk, as pop-serve does, rather than receiving them through Ray's object store.

Each replica tells which one answered in the `x-pop-replica` response header (Ray's replica id) and
which process in `x-pop-pid` (so an operator can find it on its node).  Ray Serve sends a replica
at most 2 x max_batch requests at once: its running rows and as many waiting to take a row the moment one
frees.  Ray holds the rest in the proxy's queue (max_queue requests per proxy, then 503 with Retry-After)
and gives each to the first replica with room.  Were the limit the engine's own max_queue, a proxy would
pile everything onto one replica: Ray Serve prefers replicas on the proxy's own node until they are full.
"""
import os
from dataclasses import asdict, dataclass

from ray import serve

from pop.runtime.errors import PopError
from pop.runtime.session import check_modes, check_prompt_chunk


@dataclass
class RayOptions:
    artifacts: str
    mode: str = "pop"
    max_batch: int = 4
    max_queue: int = 64
    threads: int = 1  # per replica; Ray reserves as many CPUs for it
    backend: str | None = None
    model_name: str | None = None
    grace: float = 30.0
    replicas: int = 1
    autoscale: tuple | None = None  # (min, max) replicas; replaces `replicas`
    prompt_chunk: int | None = None  # tokens per graph call reading a prompt; 0: one call; None: the backend's

    def check(self):
        check_modes([self.mode])
        if self.max_batch < 1 or self.max_queue < 0 or self.threads < 1 or self.replicas < 1:
            raise PopError("need max_batch >= 1, max_queue >= 0, threads >= 1 and replicas >= 1")
        check_prompt_chunk(self.prompt_chunk)
        if self.autoscale and not 0 <= self.autoscale[0] <= self.autoscale[1] >= 1:
            raise PopError("autoscale takes MIN,MAX replicas with 0 <= MIN <= MAX and MAX >= 1")
        return self


class PopReplica:
    """One replica: loads the artifacts and starts its engine in its own process; its ASGI app is
    pop-serve's, built after the constructor (Ray Serve's late-bound ingress)."""

    def __init__(self, options: dict):
        from pop.runtime.engine import Engine
        from pop.runtime.session import PopSession
        o = RayOptions(**options)
        session = PopSession.load(o.artifacts, backend=o.backend, threads=o.threads, prompt_chunk=o.prompt_chunk,
                                  modes=(o.mode,))
        self.engine = Engine(session, o.max_batch, o.max_queue, o.mode)
        self.options = o
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self):
        from .app import create_app
        app = create_app(self.engine, self.options.model_name, self.options.grace)
        replica, pid = self.replica, str(os.getpid())

        @app.middleware("http")
        async def tag(request, call_next):
            response = await call_next(request)
            response.headers["x-pop-replica"] = replica
            response.headers["x-pop-pid"] = pid
            return response
        return app


def deployment(o: RayOptions):
    """The Ray Serve application for `o`: bind it and serve.run it, or return it from a builder."""
    o.check()
    scale = ({"autoscaling_config": {"min_replicas": o.autoscale[0], "max_replicas": o.autoscale[1],
                                     "target_ongoing_requests": o.max_batch}}
             if o.autoscale else {"num_replicas": o.replicas})
    cls = serve.deployment(name="pop", ray_actor_options={"num_cpus": o.threads},
                           max_ongoing_requests=2 * o.max_batch, max_queued_requests=o.max_queue,
                           graceful_shutdown_timeout_s=o.grace, health_check_period_s=2,
                           health_check_timeout_s=30, **scale)(serve.ingress()(PopReplica))
    return cls.bind(asdict(o))


def build_app(args: dict):
    """`serve run pop.serve.ray_app:build_app artifacts=DIR [replicas=N | autoscale=MIN,MAX] [mode=pop|full]
    [max_batch=4] [max_queue=64] [threads=1] [backend=ort] [model_name=NAME] [grace=30] [prompt_chunk=N]`."""
    if "artifacts" not in args:
        raise PopError("build_app needs artifacts=DIR (a folder every node can read)")
    types = {"max_batch": int, "max_queue": int, "threads": int, "replicas": int, "grace": float,
             "prompt_chunk": int}
    o = {k: types.get(k, str)(v) for k, v in args.items() if k != "autoscale"}
    if "autoscale" in args:
        o["autoscale"] = tuple(int(v) for v in str(args["autoscale"]).split(","))
    try:
        return deployment(RayOptions(**o))
    except TypeError as e:
        raise PopError(f"build_app: {e}") from None
