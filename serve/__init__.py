"""pop.serve: an OpenAI-compatible HTTP server over the continuous-batching engine (pop.runtime.engine).

    from pop.runtime.engine import Engine
    from pop.runtime.session import PopSession
    from pop.serve import create_app

    app = create_app(Engine(PopSession.load("artifacts/gemma3-270m-onnx-pop"), max_batch=4))
    # serve it with uvicorn, or mount it in your own FastAPI/Starlette app: outer.mount("/llm", app)

`pop-serve DIR` does the same from the command line (pop.cli.serve).
"""
from .app import create_app

__all__ = ["create_app"]
