"""The HTTP side of pop-serve: OpenAI's completions and chat completions (streamed as server-sent
events or not), models, health and metrics, over one Engine.

Each request submits to the engine and then waits on an asyncio queue that the engine's thread feeds
(loop.call_soon_threadsafe), so the event loop never blocks on a graph call.  A streamed request whose
client goes away is cancelled, and the engine frees its row at its next step."""
import asyncio
import contextlib
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from pop.runtime.engine import Closed, QueueFull
from pop.runtime.errors import PopError
from pop.runtime.sampling import Sampler

from . import openai
from .metrics import Metrics
from .text import TextStream


def create_app(engine, model_name=None, grace_s=30.0):
    """A FastAPI app serving `engine` (pop.runtime.engine.Engine) as `model_name` (default: the artifacts'
    model).  On shutdown it stops admitting, lets running requests finish for grace_s, then cancels."""
    session = engine.session
    name = model_name or session.manifest.model.name
    metrics = Metrics(engine)
    state = {"draining": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state["draining"] = True
        await asyncio.get_running_loop().run_in_executor(None, engine.drain, grace_s)
        engine.close()

    app = FastAPI(title="pop-serve", lifespan=lifespan)

    def error(status, message, kind="invalid_request_error", code=None, headers=None, param=None):
        return JSONResponse(openai.error_body(message, kind, code, param), status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                     "invalid_request_error")

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc):
        return error(400, str(exc), param=exc.param)

    @app.get("/health")
    async def health():
        if state["draining"]:
            return error(503, "shutting down", "unavailable")
        return {"status": "ok", "model": name, **engine.snapshot()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "pop"}]}

    async def parse(request, schema):
        """The request's body as `schema`, whatever its content type says; BadRequest (a 400) if it is not."""
        try:
            return schema.model_validate(json.loads(await request.body()))
        except json.JSONDecodeError as e:
            raise BadRequest(f"malformed JSON: {e}") from None
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise BadRequest(f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg"),
                             where or None) from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        received = time.perf_counter()
        body = await parse(request, openai.CompletionRequest)
        return await answer(body, body.prompt, None, body.max_tokens or 16, False, received)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        received = time.perf_counter()
        body = await parse(request, openai.ChatRequest)
        try:
            messages, images = openai.template_messages(body.messages)
            prompt = session.render_chat(messages)
        except (ValueError, PopError) as e:
            return error(400, str(e))
        limit = body.max_completion_tokens or body.max_tokens or session.max_seq_len
        return await answer(body, prompt, images or None, limit, True, received)

    async def answer(body, prompt, images, max_tokens, chat, received):
        if body.model is not None and body.model != name:
            return error(404, f"model {body.model!r} is not served here; this server has {name!r}",
                         "not_found_error", "model_not_found")
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        sampler = Sampler(body.temperature, body.top_k, body.top_p, body.seed)
        try:
            handle = engine.submit(prompt, max_tokens, sampler, images, body.ignore_eos,
                                   lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except QueueFull as e:
            metrics.rejected.inc()
            return error(429, str(e), "rate_limit_error", "queue_full", {"Retry-After": "1"})
        except Closed as e:
            metrics.rejected.inc()
            return error(503, str(e), "unavailable", "shutting_down", {"Retry-After": "5"})
        except PopError as e:
            return error(400, str(e))
        text = TextStream(session.decode, body.stops())
        rid = openai.new_id("chatcmpl" if chat else "cmpl")

        async def pieces():
            """(text piece, finish reason or None) as tokens come."""
            last = None
            while True:
                event = await events.get()
                if event.kind == "error":
                    raise PopError(event.error)
                if event.kind == "done":
                    metrics.requests.labels(event.finish_reason).inc()
                    yield text.finish(), openai.FINISH.get(event.finish_reason, event.finish_reason)
                    return
                metrics.token(event.at)
                (metrics.ttft if last is None else metrics.itl).observe(event.at - (last or received))
                last = event.at
                piece = text.add(event.token)
                if text.stopped:
                    handle.cancel()
                    metrics.requests.labels("stop").inc()
                    yield piece, "stop"
                    return
                if piece:
                    yield piece, None

        def use():
            return openai.usage(len(handle.prompt_ids or ()), len(text.ids))

        if not body.stream:
            out = []
            try:
                async for piece, finish in pieces():
                    out.append(piece)
            except PopError as e:
                metrics.requests.labels("failed").inc()
                return error(500, str(e), "server_error")
            return openai.completion(rid, name, "".join(out), finish, use(), chat)

        async def stream():
            try:
                if chat:  # OpenAI's chat streams open with the assistant's role
                    yield sse(openai.chunk(rid, name, "", None, chat, first=True))
                async for piece, finish in pieces():
                    if piece or finish:
                        yield sse(openai.chunk(rid, name, piece, finish, chat, use=use() if finish else None))
            except PopError as e:
                metrics.requests.labels("failed").inc()
                yield sse(openai.error_body(str(e), "server_error"))
            finally:  # the client went away (the task is cancelled), or the request is over
                if not handle.done:
                    handle.cancel()
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


class BadRequest(Exception):
    """A request body that is not JSON or not the route's schema: answered as OpenAI's 400 error."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
