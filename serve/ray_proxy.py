"""Ray Serve's HTTP proxy, told what a lost replica means to an OpenAI client.

When a replica process dies with a request on it, Ray Serve's proxy (2.60) answers a plain-text
"500 Internal Server Error" if nothing was sent yet, and cuts the connection in the middle of a
streamed answer; a client cannot tell either from a bug.  This middleware, which the proxy loads through
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=pop.serve.ray_proxy:middlewares, turns them into what
pop-serve's own errors look like: a 503 JSON error with Retry-After when nothing was sent, and a final
server-sent error event plus [DONE] when a stream was cut.  Both say the request may be retried.  The
proxy's own plain-text errors (408 timed out, 503 back-pressure when the deployment's queue is full) get
the same JSON shape, status and Retry-After kept.  The replicas' own JSON errors pass unchanged.

pop-serve --ray sets the variable for the Ray instance it starts; a cluster started with `ray start` needs
it in the environment of every node (README, "Scale-out").
"""
import json

from starlette.middleware import Middleware

MESSAGE = "the replica serving this request was lost before it finished; retry the request"


def _error(message):
    return {"error": {"message": message, "type": "unavailable", "param": None, "code": "replica_lost"}}


class ReplicaLoss:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "finished": False, "stream": False, "held": None, "body": b""}

        async def watched(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                kind = headers.get(b"content-type", b"")
                state["started"] = True
                state["stream"] = kind.startswith(b"text/event-stream")
                if message["status"] >= 400 and not kind.startswith((b"application/json", b"text/event-stream")):
                    state["held"] = message  # the proxy's own plain-text error: rewritten when complete
                    return
            elif message["type"] == "http.response.body":
                if state["held"] is not None:
                    state["body"] += message.get("body", b"")
                    if not message.get("more_body", False):
                        state["finished"] = True
                        await _send_json(send, state["held"], state["body"])
                    return
                if not message.get("more_body", False):
                    state["finished"] = True
            await send(message)

        await self.app(scope, receive, watched)
        if state["finished"]:
            return
        try:
            if not state["started"]:  # nothing reached the client: a clean, retryable 503
                body = json.dumps(_error(MESSAGE)).encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            elif state["stream"]:  # a stream cut short: end it with an error event, as pop-serve does
                event = f"data: {json.dumps(_error(MESSAGE))}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": event})
        except OSError:  # the client went away too
            pass


async def _send_json(send, start, text):
    """The proxy's plain-text error `text` as an OpenAI-style JSON error, its status and Retry-After kept
    (a 503 without one gets one: back-pressure and a deployment still starting both pass)."""
    status = start["status"]
    headers = {k.lower(): v for k, v in start.get("headers") or []}
    message = text.decode(errors="replace").strip() or f"HTTP {status}"
    kind = {408: "timeout", 429: "rate_limit", 503: "unavailable"}.get(status, "server_error")
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    retry = headers.get(b"retry-after") or (b"1" if status == 503 else None)
    out += [(b"retry-after", retry)] if retry else []
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


def middlewares():
    """What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH points at: the proxy's extra Starlette middlewares."""
    return [Middleware(ReplicaLoss)]


ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "pop.serve.ray_proxy:middlewares"}
