"""Chat templates rendered the way transformers' apply_chat_template(tokenize=False) does
(transformers/utils/chat_template_utils.py), with jinja2 and nothing else."""
import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import PopError


def render(template: str, messages: list, add_generation_prompt: bool = True, **special_tokens) -> str:
    """The prompt text of messages; special_tokens are the tokenizer's (bos_token="<bos>", ...)."""
    # HF drops None-valued keys: templates often print them as "None" but handle missing ones.
    messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
    try:
        return _compiled(template).render(messages=messages, tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as e:
        raise PopError(f"chat template: {e.message or type(e).__name__}") from None


def user_message(text: str, num_images: int) -> list:
    """One user turn: the images first, then the text, as HF model cards write it."""
    images = [{"type": "image"} for _ in range(num_images)]
    return [{"role": "user", "content": images + [{"type": "text", "text": text}]}]


@lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise PopError(f"chat template: line {e.lineno}: {e.message}") from None


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; HF's (and the templates' authors') doesn't.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)
