"""Phi-3 chat templates, written out in Python (no Jinja: nothing from a model repo is executed).

Names and behaviour (spec §8.1, §8.2):
- "phi3":            mini / 3.5-mini later revisions: per message `<|{role}|>\\n{content}<|end|>\\n`
                     (system, user, assistant), then `<|assistant|>\\n` if add_generation_prompt else eos.
- "phi3.5":          like "phi3" but a system message is written only when its content is non-empty
                     (3.5-mini; 3.5-MoE assumed identical).
- "phi3-mini-april": bos, then user -> `<|user|>\\n{c}<|end|>\\n<|assistant|>\\n`, assistant ->
                     `{c}<|end|>\\n`; system messages dropped; add_generation_prompt has no effect.
- "phi3-medium":     "phi3-mini-april" without the leading bos.
- "phi3-small":      bos (`<|endoftext|>`) + per message `<|{role}|>\\n{content}<|end|>\\n`, then
                     `<|assistant|>\\n` if add_generation_prompt else eos.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from phi3_jax.data.errors import DataError

CHAT_TEMPLATES = ("phi3", "phi3.5", "phi3-mini-april", "phi3-medium", "phi3-small")
ROLES = ("system", "user", "assistant")


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise DataError(f"chat message {i}: unknown role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise DataError(f"chat message {i}: content must be str, got {type(m['content']).__name__}")


def chat_document(messages: Sequence[Mapping[str, str]], where: str = "") -> dict:
    """A conversation as a document: its "messages" (checked; errors start with `where`) and their contents as
    "text", which quality scorers and tokenizer trainers read."""
    try:
        check_messages(messages)
    except DataError as e:
        raise DataError(f"{where}: {e}" if where else str(e)) from None
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "text": "\n\n".join(m["content"] for m in messages)}


def pair_document(chosen: Sequence[Mapping[str, str]], rejected: Sequence[Mapping[str, str]], where: str = "") -> dict:
    """A preference pair as a document: its "chosen" and "rejected" conversations (checked, each ending with an
    assistant message; errors start with `where` and name the field) and the chosen contents as "text"."""
    docs = {}
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        label = f"{where}: field {field!r}" if where else f"field {field!r}"
        docs[field] = chat_document(messages, label)
        checked = docs[field]["messages"]
        if not checked or checked[-1]["role"] != "assistant":
            ends = f"it ends with a {checked[-1]['role']} message" if checked else "it is empty"
            raise DataError(f"{label}: the conversation must end with an assistant message; {ends}")
    return {"chosen": docs["chosen"]["messages"], "rejected": docs["rejected"]["messages"],
            "text": docs["chosen"]["text"]}


def render_chat(template: str, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool,
                bos_token: str, eos_token: str) -> str:
    """The prompt string for `messages`; encode it with `allow_special=True`."""
    if template not in CHAT_TEMPLATES:
        raise DataError(f"unknown chat template {template!r}; known: {CHAT_TEMPLATES}")
    check_messages(messages)
    if template in ("phi3-mini-april", "phi3-medium"):
        out = [bos_token] if template == "phi3-mini-april" else []
        for m in messages:
            if m["role"] == "user":
                out.append(f"<|user|>\n{m['content']}<|end|>\n<|assistant|>\n")
            elif m["role"] == "assistant":
                out.append(f"{m['content']}<|end|>\n")
        return "".join(out)
    out = [bos_token] if template == "phi3-small" else []
    for m in messages:
        if template == "phi3.5" and m["role"] == "system" and not m["content"]:
            continue
        out.append(f"<|{m['role']}|>\n{m['content']}<|end|>\n")
    out.append("<|assistant|>\n" if add_generation_prompt else eos_token)
    return "".join(out)
