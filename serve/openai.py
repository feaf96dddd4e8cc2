"""The OpenAI API's request and response shapes that pop-serve speaks (completions, chat completions).

Requests are checked by pydantic: a field of the wrong type or out of range is a 400 with OpenAI's error
body.  Fields this server does not use are ignored, as OpenAI-compatible servers do, except those whose
non-default values it would silently get wrong (n > 1, logprobs, best_of), which are refused."""
import base64
import binascii
import io
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "max_seq_len": "length"}


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # chat's newer name for max_tokens
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not OpenAI's: vLLM's and llama.cpp's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    logprobs: bool | int | None = None
    best_of: int | None = Field(None, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    def stops(self):
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("one prompt per request (send several requests; they are batched)")
            v = v[0]
        if not v:
            raise ValueError("empty prompt")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


def template_messages(messages):
    """(messages as chat templates take them, the images in order): image parts become {"type": "image"}."""
    out, images = [], []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            out.append({"role": role, "content": m.content})
            continue
        parts = []
        for part in m.content:
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                images.append(load_data_url(part.image_url.url))
                parts.append({"type": "image"})
        out.append({"role": role, "content": parts})
    return out, images


def load_data_url(url):
    """A PIL image from a data: URL (this server fetches nothing from the network)."""
    from PIL import Image
    if not url.startswith("data:") or ";base64," not in url:
        raise ValueError("image_url must be a data: URL with base64 content (data:image/png;base64,...)")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1], validate=True)))
        image.load()
    except (binascii.Error, OSError, ValueError) as e:
        raise ValueError(f"image_url holds no readable image: {e}") from None
    return image.convert("RGB")


def error_body(message, kind="invalid_request_error", code=None, param=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid, model, text, finish, use, chat):
    """The whole response of a non-streamed request."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(rid, model, text, finish, chat, first=False, use=None):
    """One server-sent event of a streamed request; the last one carries finish_reason and usage."""
    if chat:
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [choice]}
    if use is not None:
        out["usage"] = use
    return out
