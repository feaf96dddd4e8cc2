"""Real text cut into evaluation windows: a prompt, then its continuation."""
from pop.runtime.errors import PopError


def windows(text, tokenizer, prompt_len, continuation_len, samples, bos_id=None, path="data"):
    """Up to `samples` non-overlapping windows spread evenly over the text.

    Each is (prompt ids, continuation ids); with bos_id, the prompt starts with
    BOS (Gemma needs it at the start of every sequence) and the text fills the rest.
    """
    ids = tokenizer(text, add_special_tokens=False).input_ids
    body = prompt_len - (bos_id is not None)
    width = body + continuation_len
    count = len(ids) // width
    if count == 0:
        raise PopError(f"{path} has {len(ids)} tokens, shorter than one window of {width} "
                       f"({prompt_len} prompt + {continuation_len} continuation)")
    step = count / min(samples, count)
    out = []
    for i in range(min(samples, count)):
        start = int(i * step) * width
        prompt = ids[start:start + body]
        out.append(([bos_id] + prompt if bos_id is not None else prompt, ids[start + body:start + width]))
    return out

