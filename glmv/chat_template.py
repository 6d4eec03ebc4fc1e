"""Render a checkpoint's own Jinja chat template, in a sandbox, with the environment transformers uses.

Chat templates come with checkpoints and are untrusted: they run in Jinja's ImmutableSandboxedEnvironment, and
everything handed to them is first rebuilt from plain JSON types (a decoded image becomes the string "<Image>"),
so a template can only test for the presence of media, never call methods on it.
The environment settings (trim_blocks, lstrip_blocks, loop controls, a `tojson` that does not HTML-escape,
`raise_exception`, `strftime_now`, a namespace that refuses private names) match transformers', so templates
render byte-for-byte the same.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Message keys that carry a model's reasoning; templates read `reasoning_content`.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` for templates; rejects underscore names so templates cannot reach interpreter internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set private attribute {name!r}")


def _make_dict(*args, **kwargs) -> dict:
    return dict(*args, **kwargs)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_make_dict,
                       namespace=_SafeNamespace)
    return env.from_string(source)


def plain_data(value: Any) -> Any:
    """A copy built only from JSON-like types; anything else becomes an inert "<TypeName>" string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalars
        return plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    out = []
    for message in messages:
        reasoning = next((message[k] for k in REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# appended to the text being continued, so that the rendered prompt can be cut right after it
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(messages: list[dict], field: str, template: str) -> str:
    """Append CONTINUE_TAG to the final message's `field` (its last text block, for a list of blocks); the text
    being continued. transformers' rules and messages."""
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty")
    final = messages[-1].get(field)
    if final is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue')
    fields = [k for k in REASONING_KEYS if messages[-1].get(k) == final] if field in REASONING_KEYS else [field]
    if not any(f in template for f in fields):
        raise ValueError(f'continue_final_message is set to "{field}", which this chat template never reads')
    if isinstance(final, list):
        block = next((b for b in reversed(final) if isinstance(b, dict) and "text" in b), None)
        if block is None:
            raise ValueError("continue_final_message is set but the final message holds no text to continue")
        final, block["text"] = block["text"], block["text"] + CONTINUE_TAG
        return final
    for f in fields:
        messages[-1][f] = final + CONTINUE_TAG
    return final


def _cut_after_final_message(rendered: str, final: str) -> str:
    tag = CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message is set but the chat template drops part of the final message")
    at = rendered.rindex(tag)
    # a template that trims the message's trailing space trimmed the tag's too
    return rendered[:at] if rendered[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else rendered[:at].rstrip()


def render(
    template: str,
    conversations: list[list[dict]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **template_kwargs: Any,
) -> list[str]:
    """One prompt string per conversation. Keys with value None are dropped from messages (as transformers does).
    continue_final_message (True: "content", or another field): the prompt ends inside the final message, right
    after its text, so that generation continues it."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot be used together: one continues "
                         "the final message, the other opens a new assistant message")
    field = continue_final_message if isinstance(continue_final_message, str) else "content"
    compiled = compile_template(template)
    for tool in tools or ():
        if not isinstance(tool, dict):  # a Python function would reach the template as the string "<function>"
            raise ValueError(f"tools must be JSON-schema dicts ({{'type': 'function', 'function': {{'name': ..., "
                             f"'parameters': ...}}}}); glmv does not derive schemas from Python functions, got {tool!r}")
    tools, documents, template_kwargs = plain_data(tools), plain_data(documents), plain_data(template_kwargs)
    prompts = []
    for conversation in conversations:
        messages = [{k: v for k, v in m.items() if v is not None} for m in plain_data(list(conversation))]
        for m in messages:
            if not isinstance(m, dict):
                raise TypeError(f"chat messages must be dicts, got {m!r}")
        messages = _alias_reasoning(messages)
        final = _tag_final_message(messages, field, template) if continue_final_message else None
        prompt = compiled.render(messages=messages, tools=tools, documents=documents,
                                 add_generation_prompt=add_generation_prompt, **template_kwargs)
        prompts.append(prompt if final is None else _cut_after_final_message(prompt, final))
    return prompts
