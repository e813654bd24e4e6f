"""Items as users have them (text / prompt+response / messages): validation and the one formatter.

The formatting template is part of a subspace's identity: fit and score must format alike, so the
template name is stored in every manifest and passed back here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Template = Literal["chat", "plain"]
ItemKind = Literal["text", "pair"]
ROLES = ("system", "user", "assistant")

#: Documented fallback used by template "plain", and by "chat" for tokenizers without a chat template.
PLAIN_PAIR_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n{response}"


class ItemError(ValueError):
    """An item that cannot be scored; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Item:
    """One sample in canonical form: a list of (role, content) turns."""

    turns: tuple[tuple[str, str], ...]

    @property
    def kind(self) -> ItemKind:
        """'pair' when an assistant turn is present (the harm may sit in the response)."""
        return "pair" if any(role == "assistant" for role, _ in self.turns) else "text"


def _text_field(obj: Mapping[str, Any], name: str) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise ItemError(name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ItemError(name, "is empty or whitespace only")
    if "\x00" in value:
        raise ItemError(name, "contains a NUL character")
    return value


def parse_item(obj: Any) -> Item:
    """Validate a decoded JSON object into an ``Item``.

    Precedence: ``messages``, then ``prompt`` + ``response``, then ``text``, then ``prompt`` alone
    (a request without an answer). Extra fields (``id``, ``label``, metadata) are ignored here.
    """
    if not isinstance(obj, Mapping):
        raise ItemError("item", f"must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ItemError("messages", "must be a non-empty list of {role, content} objects")
        turns = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ItemError(f"messages[{i}]", "must be an object with 'role' and 'content'")
            role = message.get("role")
            if role not in ROLES:
                raise ItemError(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
            if "content" not in message:
                raise ItemError(f"messages[{i}].content", "is missing")
            try:
                content = _text_field(message, "content")
            except ItemError as err:
                raise ItemError(f"messages[{i}].content", err.message) from None
            turns.append((role, content))
        return Item(tuple(turns))
    if "prompt" in obj and "response" in obj:
        return Item((("user", _text_field(obj, "prompt")), ("assistant", _text_field(obj, "response"))))
    if "text" in obj:
        return Item((("user", _text_field(obj, "text")),))
    if "prompt" in obj:
        return Item((("user", _text_field(obj, "prompt")),))
    raise ItemError("item", "needs one of 'text', 'prompt' (+ 'response') or 'messages'")


def parse_label(obj: Mapping[str, Any]) -> int | None:
    """The optional 0/1 harm label of a calibration or evaluation line."""
    if "label" not in obj or obj["label"] is None:
        return None
    label = obj["label"]
    if isinstance(label, bool) or label not in (0, 1):
        raise ItemError("label", f"must be 0 or 1, got {label!r}")
    return int(label)


def _plain(item: Item) -> str:
    roles = [role for role, _ in item.turns]
    if roles == ["user"]:
        return item.turns[0][1]
    if roles == ["user", "assistant"]:
        return PLAIN_PAIR_TEMPLATE.format(prompt=item.turns[0][1], response=item.turns[1][1])
    return "\n\n".join(f"{role}: {content}" for role, content in item.turns)


def make_formatter(template: Template, chat_template: Callable[[Sequence[Mapping[str, str]]], str] | None) -> Callable[[Item], str]:
    """The single item → string function for a template.

    "chat" renders the turns with the model's chat template (``chat_template``), falling back to
    "plain" when the tokenizer has none (encoders). "plain" is the documented template above:
    a lone text as is, a pair as ``PLAIN_PAIR_TEMPLATE``, longer conversations as ``role: content``
    paragraphs.
    """
    if template == "plain" or chat_template is None:
        return _plain
    if template != "chat":
        raise ItemError("template", f"must be 'chat' or 'plain', got {template!r}")

    def _chat(item: Item) -> str:
        return chat_template([{"role": role, "content": content} for role, content in item.turns])

    return _chat

