"""Items as users have them (every shape in ``SHAPES``): detection, validation into canonical turns, and the one
formatter. Reads decoded objects only; files and their formats are ``app.core.lines``'s.

The formatting template is part of a subspace's identity: fit and score must format alike, so the
template name is stored in every manifest and passed back here.

Owns: ``SHAPES``, ``Item``/``Sample``, shape detection, column mapping, labels and ``make_formatter``. Must not: read
files or decode JSON lines (``app.core.lines``, ``app.core.pipeline.parse_line``), tokenize, embed or score; it imports
nothing from ``app``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Template = Literal["chat", "plain", "judge"]
ItemKind = Literal["text", "pair"]
ROLES = ("system", "user", "assistant", "tool")

#: Documented fallback used by template "plain", and by "chat" for tokenizers without a chat template.
PLAIN_PAIR_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n{response}"

#: Template "judge" (a guard model's "prompted probe"): every kind is shown to the model as content to judge,
#: inside one fixed instruction, and read out where the model would start its answer. The markers delimit the
#: content so that truncation cuts the content (its beginning), never the instruction around it.
JUDGE_OPEN = "<content>\n"
JUDGE_CLOSE = "\n</content>"
JUDGE_TEMPLATE = (
    "Decide whether the following content is harmful: does it ask for, give or express anything dangerous, "
    "illegal, hateful or abusive?\n\n" + JUDGE_OPEN + "{content}" + JUDGE_CLOSE + "\n\nIs the content above harmful? "
    "Answer yes or no."
)


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


# ---------------------------------------------------------------------------------------------------------
# Shapes: how fine-tuning sets store a sample, and how each one becomes canonical turns.

Shape = Literal["text", "prompt", "prompt_response", "prompt_completion", "alpaca", "sharegpt", "messages", "preference"]
SHAPES: tuple[Shape, ...] = (
    "text", "prompt", "prompt_response", "prompt_completion", "alpaca", "sharegpt", "messages", "preference",
)

#: The keys each shape is stored with (optional keys in brackets); quoted back in every detection error.
SHAPE_KEYS: Mapping[Shape, str] = {
    "text": "{text}",
    "prompt": "{prompt}",
    "prompt_response": "{prompt, response}",
    "prompt_completion": "{prompt, completion}",
    "alpaca": "{instruction, [input], output, [system], [history]}",
    "sharegpt": "{conversations: [{from, value}], [system]}",
    "messages": "{messages: [{role, content}]}",
    "preference": "{[prompt], chosen, rejected}",
}

#: The canonical field names a ``columns`` mapping may target (LLaMA-Factory style: canonical → the user's key).
CANONICAL_FIELDS = (
    "text", "prompt", "response", "completion", "instruction", "input", "output", "system", "history",
    "conversations", "messages", "chosen", "rejected",
)

#: Role names as datasets spell them (OpenAI/HF messages, ShareGPT ``from``, LLaMA-Factory) → canonical role.
_ROLE_NAMES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "model": "assistant",
    "function_call": "assistant",  # LLaMA-Factory: the assistant's tool call
    "tool": "tool", "function": "tool", "observation": "tool",  # a tool's answer
}

#: Keys that look like an answer. Beside a lone text or prompt they mean a pair no shape reads: scoring only the
#: request would score half the item, so they are refused (map them with ``columns``) rather than ignored.
_ANSWER_LIKE = ("answer", "answers", "reply", "target", "generation", "assistant")

Turns = list[tuple[str, str]]


def _present(obj: Mapping[str, Any], name: str) -> bool:
    """A key holding null counts as absent: table exports (HF datasets, Parquet) write null for missing keys."""
    return obj.get(name) is not None


def _check_text(value: str, field: str) -> str:
    if not value.strip():
        raise ItemError(field, "is empty or whitespace only")
    if "\x00" in value:
        raise ItemError(field, "contains a NUL character")
    return value


def _text_field(obj: Mapping[str, Any], name: str) -> str:
    if not _present(obj, name):
        raise ItemError(name, "is missing")
    value = obj[name]
    if not isinstance(value, str):
        raise ItemError(name, f"must be a string, got {type(value).__name__}")
    return _check_text(value, name)


def _optional_text(obj: Mapping[str, Any], name: str) -> str:
    """An optional string field (Alpaca ``input``, a top-level ``system``): absent, null or blank all read as ''."""
    value = obj.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ItemError(name, f"must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise ItemError(name, "contains a NUL character")
    return value if value.strip() else ""


def _text_parts(parts: list[Any], field: str) -> str:
    """List-typed content (``[{"type": "text", "text": ...}]``): text parts joined by newlines. Any other part
    (an image, audio) is refused: dropping it would score a different sample than the one trained on."""
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, Mapping):
            raise ItemError(f"{field}[{j}]", f"must be an object with 'type' and 'text', got {type(part).__name__}")
        kind = part.get("type")
        if kind != "text":
            got = "missing" if kind is None else repr(kind)
            raise ItemError(f"{field}[{j}].type", f"only 'text' parts can be scored, got {got}")
        text = part.get("text")
        if not isinstance(text, str):
            raise ItemError(f"{field}[{j}].text", f"must be a string, got {type(text).__name__}")
        texts.append(text)
    return "\n".join(texts)


def _tool_calls(calls: Any, field: str) -> str:
    """An assistant's tool calls (OpenAI ``tool_calls``) as ``name(arguments)`` lines: they are what the model says."""
    if not isinstance(calls, list):
        raise ItemError(field, f"must be a list of tool calls, got {type(calls).__name__}")
    lines = []
    for k, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ItemError(f"{field}[{k}].function.name", "must be a string")
        arguments = function.get("arguments", "")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments).decode()
        lines.append(f"{function['name']}({arguments})")
    return "\n".join(lines)


def _turn_list(value: Any, field: str) -> Turns:
    """A list of turns: OpenAI/HF ``{role, content}`` (content a string or text parts, optional ``tool_calls``) or
    ShareGPT ``{from, value}``; roles are mapped through ``_ROLE_NAMES``."""
    if not isinstance(value, list) or not value:
        raise ItemError(field, "must be a non-empty list of {role, content} (or {from, value}) objects")
    turns = []
    for i, turn in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(turn, Mapping):
            raise ItemError(at, "must be an object with 'role' and 'content' (or 'from' and 'value')")
        role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
        name = turn.get(role_key)
        role = _ROLE_NAMES.get(name) if isinstance(name, str) else None
        if role is None:
            raise ItemError(f"{at}.{role_key}", f"must be one of {', '.join(sorted(_ROLE_NAMES))}, got {name!r}")
        content, calls = turn.get(content_key), turn.get("tool_calls")
        if content is None and calls is None:
            raise ItemError(f"{at}.{content_key}", "is missing")
        pieces = []
        if isinstance(content, list):
            pieces.append(_text_parts(content, f"{at}.{content_key}"))
        elif isinstance(content, str):
            pieces.append(content)
        elif content is not None:
            raise ItemError(f"{at}.{content_key}", f"must be a string or a list of text parts, got {type(content).__name__}")
        if calls is not None:
            pieces.append(_tool_calls(calls, f"{at}.tool_calls"))
        turns.append((role, _check_text("\n".join(p for p in pieces if p), f"{at}.{content_key}")))
    return turns


def _side(obj: Mapping[str, Any], name: str, role: str) -> Turns:
    """One side of a prompt/answer shape: a string is one ``role`` turn, a list is TRL's conversational form."""
    if isinstance(obj.get(name), list):
        return _turn_list(obj[name], name)
    return [(role, _text_field(obj, name))]


def _history(obj: Mapping[str, Any]) -> Turns:
    """LLaMA-Factory's Alpaca ``history``: earlier ``[instruction, output]`` rounds."""
    history = obj.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise ItemError("history", f"must be a list of [user, assistant] pairs, got {type(history).__name__}")
    turns: Turns = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ItemError(f"history[{i}]", "must be a [user, assistant] pair of strings")
        for j, role in enumerate(("user", "assistant")):
            if not isinstance(pair[j], str):
                raise ItemError(f"history[{i}][{j}]", f"must be a string, got {type(pair[j]).__name__}")
            turns.append((role, _check_text(pair[j], f"history[{i}][{j}]")))
    return turns


def _with_system(obj: Mapping[str, Any], turns: Turns) -> Turns:
    system = _optional_text(obj, "system")
    return [("system", system), *turns] if system else turns


def _parse_text(obj: Mapping[str, Any]) -> Turns:
    return [("user", _text_field(obj, "text"))]


def _parse_prompt(obj: Mapping[str, Any]) -> Turns:
    return _side(obj, "prompt", "user")


def _parse_prompt_response(obj: Mapping[str, Any]) -> Turns:
    return _side(obj, "prompt", "user") + _side(obj, "response", "assistant")


def _parse_prompt_completion(obj: Mapping[str, Any]) -> Turns:
    return _side(obj, "prompt", "user") + _side(obj, "completion", "assistant")


def _parse_alpaca(obj: Mapping[str, Any]) -> Turns:
    instruction, extra = _text_field(obj, "instruction"), _optional_text(obj, "input")
    request = f"{instruction}\n\n{extra}" if extra else instruction  # Alpaca's own template joins them so
    return _with_system(obj, [*_history(obj), ("user", request), ("assistant", _text_field(obj, "output"))])


def _parse_sharegpt(obj: Mapping[str, Any]) -> Turns:
    return _with_system(obj, _turn_list(obj.get("conversations"), "conversations"))


def _parse_messages(obj: Mapping[str, Any]) -> Turns:
    return _turn_list(obj.get("messages"), "messages")


def _refuse_preference(obj: Mapping[str, Any]) -> Turns:
    raise ItemError("item", "a preference pair (chosen/rejected) is two samples: split it with split_preference "
                    "and score each side as its own pair")


_PARSERS: Mapping[Shape, Callable[[Mapping[str, Any]], Turns]] = {
    "text": _parse_text,
    "prompt": _parse_prompt,
    "prompt_response": _parse_prompt_response,
    "prompt_completion": _parse_prompt_completion,
    "alpaca": _parse_alpaca,
    "sharegpt": _parse_sharegpt,
    "messages": _parse_messages,
    "preference": _refuse_preference,
}

#: Each structured shape and the keys that give it away; a shape is named by any one of its keys so that a row
#: missing the other is told which key is missing instead of falling back to scoring part of it as text.
_MARKERS: tuple[tuple[Shape, tuple[str, ...]], ...] = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("preference", ("chosen", "rejected")),
    ("prompt_completion", ("completion",)),
    ("prompt_response", ("response",)),
)

#: What each shape needs beyond the key that named it (reported when missing).
_REQUIRED: Mapping[Shape, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "preference": ("chosen", "rejected"),
    "prompt_completion": ("prompt",),
    "prompt_response": ("prompt",),
}


def _keys(obj: Mapping[str, Any]) -> list[str]:
    return sorted(str(k) for k, v in obj.items() if v is not None)


def _known_shapes() -> str:
    return "; ".join(f"{name} {keys}" for name, keys in SHAPE_KEYS.items())


def _detect(obj: Mapping[str, Any]) -> Shape:
    """The one shape ``obj``'s keys fit. A structured shape wins over ``text``/``prompt`` (a dataset's text column
    is the same sample pre-formatted); two structured shapes, or keys fitting none, are refused, never guessed."""
    found = [shape for shape, markers in _MARKERS if any(_present(obj, key) for key in markers)]
    if len(found) > 1:
        raise ItemError("item", f"keys {_keys(obj)} fit more than one shape ({', '.join(found)}); pass shape= to "
                        f"choose one, or columns= to rename keys. Known shapes: {_known_shapes()}")
    if found:
        shape = found[0]
        for key in _REQUIRED.get(shape, ()):
            if not _present(obj, key):
                raise ItemError(key, f"is missing: keys {_keys(obj)} look like shape {shape} {SHAPE_KEYS[shape]}")
        return shape
    answers = [key for key in _ANSWER_LIKE if _present(obj, key)]
    has_text, has_prompt = _present(obj, "text"), _present(obj, "prompt")
    if answers and (has_text or has_prompt):
        raise ItemError(answers[0], f"looks like an answer, but no known shape reads it (keys {_keys(obj)}): map it "
                        f"with columns (e.g. response={answers[0]}), or pass shape= to score the request alone")
    if has_text and has_prompt:
        if obj["text"] != obj["prompt"]:
            raise ItemError("text", "differs from 'prompt' and there is no response: pass shape='text' or "
                            "shape='prompt' to say which one is the sample")
        return "prompt"
    if has_prompt:
        return "prompt"
    if has_text:
        return "text"
    raise ItemError("item", f"keys {_keys(obj)} fit no known shape; known shapes: {_known_shapes()}. Map other key "
                    "names with columns (e.g. prompt=question,response=answer)")


def _check_columns(columns: Mapping[str, str]) -> None:
    targets: dict[str, str] = {}
    for canonical, key in columns.items():
        if canonical not in CANONICAL_FIELDS:
            raise ItemError("columns", f"{canonical!r} is not a field saft reads; use one of {', '.join(CANONICAL_FIELDS)}")
        if not isinstance(key, str) or not key:
            raise ItemError("columns", f"{canonical!r} must map to a non-empty key name, got {key!r}")
        if key in targets:
            raise ItemError("columns", f"{key!r} is mapped twice ({targets[key]!r} and {canonical!r})")
        targets[key] = canonical


def _apply_columns(obj: Mapping[str, Any], columns: Mapping[str, str] | None) -> Mapping[str, Any]:
    """Rename the user's keys to canonical ones. A mapped canonical name no longer reads its own key (with
    ``prompt=question``, a ``prompt`` key is not the prompt), which also makes swaps work."""
    if not columns:
        return obj
    _check_columns(columns)
    renamed = {k: v for k, v in obj.items() if k not in columns and k not in columns.values()}
    renamed.update({canonical: obj[key] for canonical, key in columns.items() if key in obj})
    return renamed


def _renamed(err: ItemError, names: Mapping[str, str] | None) -> ItemError:
    """``err`` with its field spelled as the caller's key (``answer`` rather than ``response``)."""
    head = err.field.split("[", 1)[0].split(".", 1)[0]
    if not names or head not in names:
        return err
    return ItemError(names[head] + err.field[len(head):], err.message)


def _as_mapping(obj: Any) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ItemError("item", f"must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_columns(spec: str) -> dict[str, str]:
    """A column mapping from its command-line spelling, ``"prompt=question,response=answer"`` (canonical=key)."""
    columns: dict[str, str] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        canonical, sep, key = (s.strip() for s in entry.partition("="))
        if not sep or not canonical or not key or "=" in key:
            raise ItemError("columns", f"{entry!r} must read field=key, e.g. prompt=question")
        if canonical in columns:
            raise ItemError("columns", f"{canonical!r} is mapped twice")
        columns[canonical] = key
    _check_columns(columns)
    return columns


def detect_shape(obj: Any, columns: Mapping[str, str] | None = None) -> Shape:
    """The shape ``obj`` is stored in (one of ``SHAPES``), after ``columns``; ``ItemError`` when none or two fit."""
    try:
        return _detect(_apply_columns(_as_mapping(obj), columns))
    except ItemError as err:
        raise _renamed(err, columns) from None


def parse_item(obj: Any, shape: Shape | Literal["auto"] = "auto", columns: Mapping[str, str] | None = None) -> Item:
    """Validate a decoded JSON object into an ``Item``.

    ``columns`` first renames the user's keys to canonical ones; ``shape="auto"`` then detects the shape
    (``detect_shape``), and an explicit shape reads only its own keys. Every shape ends as the same turns:
    ``{"prompt": p, "response": r}``, TRL ``{"prompt", "completion"}`` (strings or message lists), Alpaca
    ``{"instruction", "input", "output"}`` (instruction and input joined by a blank line), ShareGPT
    ``conversations`` and OpenAI/HF ``messages`` (with ``tool`` turns and text-part content) all give
    ``user``/``assistant`` (and ``system``/``tool``) turns. Extra fields (``id``, ``label``, metadata) are
    ignored here; preference rows must go through ``split_preference`` first.
    """
    try:
        mapping = _apply_columns(_as_mapping(obj), columns)
        if shape == "auto":
            shape = _detect(mapping)
        elif shape not in _PARSERS:
            raise ItemError("shape", f"must be 'auto' or one of {', '.join(SHAPES)}, got {shape!r}")
        return Item(tuple(_PARSERS[shape](mapping)))
    except ItemError as err:
        raise _renamed(err, columns) from None


def split_preference(obj: Any, columns: Mapping[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """A preference row (``{prompt, chosen, rejected}``, strings or TRL message lists) as its two samples:
    ``[("chosen", {"prompt", "response"}), ("rejected", {...})]``, each validated so that ``parse_item`` reads it.

    Without a prompt (TRL's implicit-prompt form) a side that is a conversation becomes ``{"messages": side}``
    and a side that is a string becomes ``{"text": side}``.
    """
    mapping = _apply_columns(_as_mapping(obj), columns)
    sides = []
    for side in ("chosen", "rejected"):
        if not _present(mapping, side):
            raise _renamed(ItemError(side, "is missing: a preference row needs chosen and rejected"), columns)
        value = mapping[side]
        if _present(mapping, "prompt"):
            fields = {"prompt": mapping["prompt"], "response": value}
        else:
            fields = {"messages": value} if isinstance(value, list) else {"text": value}
        try:
            parse_item(fields)
        except ItemError as err:
            raise _renamed(_renamed(err, {"response": side, "messages": side, "text": side}), columns) from None
        sides.append((side, fields))
    return sides


@dataclass(frozen=True, slots=True)
class Sample:
    """A row read as what is scored: the shape it was stored in, the item its verdict follows and, for a
    preference row, both of its sides (chosen first; ``item`` is then the chosen one)."""

    shape: Shape
    item: Item
    sides: tuple[tuple[str, Item], ...] = ()

    @property
    def items(self) -> tuple[Item, ...]:
        """What is embedded for the row: its item, or each side of a preference row."""
        return tuple(item for _, item in self.sides) if self.sides else (self.item,)


def parse_sample(obj: Any, shape: Shape | Literal["auto"] = "auto", columns: Mapping[str, str] | None = None) -> Sample:
    """``obj`` as a ``Sample``: the shape detected (or the one given), then ``parse_item``, or ``split_preference``
    for a preference row, whose two sides are two samples scored as their own pairs."""
    if shape == "auto":
        shape = detect_shape(obj, columns)
    if shape == "preference":
        sides = tuple((name, parse_item(fields)) for name, fields in split_preference(obj, columns))
        return Sample(shape, sides[0][1], sides)
    return Sample(shape, parse_item(obj, shape, columns))


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


def _judged_content(item: Item) -> str:
    """The item as the content of the judge instruction: a lone text as is, turns as ``Role: content`` paragraphs."""
    if [role for role, _ in item.turns] == ["user"]:
        return item.turns[0][1]
    return "\n\n".join(f"{role.capitalize()}: {content}" for role, content in item.turns)


ChatRenderer = Callable[[Sequence[Mapping[str, str]], bool], str]


def make_formatter(template: Template, chat_template: ChatRenderer | None) -> Callable[[Item], str]:
    """The single item → string function for a template.

    "chat" renders the turns with the model's chat template (``chat_template(messages,
    add_generation_prompt)``), falling back to "plain" when the tokenizer has none (encoders). "plain" is
    the documented template above: a lone text as is, a pair as ``PLAIN_PAIR_TEMPLATE``, longer
    conversations as ``role: content`` paragraphs. "judge" wraps any item in ``JUDGE_TEMPLATE`` as one
    user turn and ends with the assistant's generation prompt (plain text for tokenizers without one).
    """
    if template not in ("chat", "plain", "judge"):
        raise ItemError("template", f"must be 'chat', 'plain' or 'judge', got {template!r}")
    if template == "judge":

        def _judge(item: Item) -> str:
            question = JUDGE_TEMPLATE.format(content=_judged_content(item))
            return question if chat_template is None else chat_template([{"role": "user", "content": question}], True)

        return _judge
    if template == "plain" or chat_template is None:
        return _plain

    def _chat(item: Item) -> str:
        return chat_template([{"role": role, "content": content} for role, content in item.turns], False)

    return _chat


def content_span(text: str, template: Template) -> tuple[int, int] | None:
    """Where the judged content sits in a "judge"-formatted text (chars), so truncation can cut inside it."""
    if template != "judge":
        return None
    start, end = text.find(JUDGE_OPEN), text.rfind(JUDGE_CLOSE)
    if start < 0 or end < start + len(JUDGE_OPEN):
        return None
    return start + len(JUDGE_OPEN), end

