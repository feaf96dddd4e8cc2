"""pop-serve: an OpenAI-compatible HTTP server over exported artifacts, batching requests continuously."""
import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from pop.runtime.backends import BACKENDS
from pop.runtime.errors import PopError
from pop.runtime.session import MODES, PopSession

from .options import add_runtime


def parser():
    p = argparse.ArgumentParser(prog="pop-serve", description="Serve pop artifacts over OpenAI's HTTP API "
                                "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).")
    p.add_argument("artifacts", help="a folder written by pop-export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=4,
                   help="requests decoding at once: the KV buffer's rows, allocated at start-up (default 4)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a row; beyond it requests get 429 (default 64)")
    p.add_argument("--mode", default="pop", choices=MODES, help="prompt phase: pop (shallow prefill) or full")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the artifacts' model)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds that running requests get to finish after SIGTERM before they are cancelled")
    add_runtime(p, BACKENDS)
    ray = p.add_argument_group("Ray Serve (pip install -e '.[ray]'): replicas, each a process with its own engine")
    ray.add_argument("--ray", action="store_true", help="deploy on a Ray cluster behind Ray Serve's HTTP proxy")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="replicas (default 1)")
    scale.add_argument("--autoscale", type=_pair, metavar="MIN,MAX", default=None,
                       help="let Ray Serve scale between MIN and MAX replicas by ongoing requests")
    ray.add_argument("--proxy-location", default="EveryNode", choices=("EveryNode", "HeadOnly"),
                     help="where Ray Serve runs its HTTP proxy (default EveryNode; a node lost takes the "
                          "connections of its own proxy with it)")
    ray.add_argument("--address", default=None,
                     help="the cluster to join (auto, HOST:PORT of its head, or ray://...); default: start a local one")
    return p


def _pair(text):
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("--autoscale takes MIN,MAX replicas, e.g. 1,4") from None
    return low, high


def main(argv=None):
    args = parser().parse_args(argv)
    if args.max_batch < 1 or args.max_queue < 0 or not 0 < args.port < 65536:
        raise PopError("need --max-batch >= 1, --max-queue >= 0 and a port in 1..65535")
    if args.ray:
        return _serve_on_ray(args)
    try:
        import uvicorn
    except ImportError:
        raise PopError("pop-serve needs its server stack: pip install -e '.[serve]'") from None
    from pop.runtime.engine import Engine
    from pop.serve import create_app
    session = PopSession.load(args.artifacts, backend=args.backend, threads=args.threads,
                              prepack=args.prepack_weights, tf32=args.tf32, prompt_chunk=args.prompt_chunk,
                              modes=(args.mode,))  # the other mode's graphs stay unopened
    engine = Engine(session, args.max_batch, args.max_queue, args.mode)
    app = create_app(engine, args.model_name, args.grace)
    print(f"pop-serve: {session.manifest.model.name} ({args.mode} mode, {args.max_batch} rows) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    # uvicorn stops accepting on SIGTERM, waits up to the grace for open requests, runs the app's shutdown
    # (engine.drain), then hands the signal to the handler that was there before it: this one, so that a
    # drained server exits 0 rather than dying of the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.grace)
    return 0


def _serve_on_ray(args):
    """Deploys pop.serve.ray_app on a Ray cluster and waits for SIGTERM or Ctrl-C, then takes it down."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise PopError("pop-serve --ray needs Ray Serve: pip install -e '.[ray]'") from None
    from pop.runtime.manifest import Manifest
    from pop.serve.ray_app import RayOptions, deployment
    artifacts = Path(args.artifacts).resolve()
    Manifest.load(artifacts)  # a bad folder fails here in one line, not in every replica
    app = deployment(RayOptions(str(artifacts), args.mode, args.max_batch, args.max_queue, args.threads or 1,
                                args.backend, args.model_name, args.grace, args.replicas, args.autoscale,
                                args.prompt_chunk))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    from pop.serve.ray_proxy import ENV
    for key, value in ENV.items():  # the proxy's middleware, for the Ray instance that ray.init starts here
        os.environ.setdefault(key, value)
    ray.init(address=args.address, logging_level="warning", log_to_driver=False)
    try:
        serve.start(proxy_location=args.proxy_location, http_options={"host": args.host, "port": args.port})
        serve.run(app, name="pop", route_prefix="/", blocking=False)
        count = f"{args.autoscale[0]}-{args.autoscale[1]}" if args.autoscale else str(args.replicas)
        print(f"pop-serve: {artifacts.name} on Ray ({count} replicas, {args.mode} mode, {args.max_batch} rows "
              f"each) on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
