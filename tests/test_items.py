"""Item formats and their validation: every problem names its field."""

import pytest

from app.core.items import PLAIN_PAIR_TEMPLATE, Item, ItemError, make_formatter, parse_item, parse_label


def test_three_formats_parse_to_turns() -> None:
    assert parse_item({"text": "hi"}) == Item((("user", "hi"),))
    assert parse_item({"prompt": "p", "response": "r"}).turns == (("user", "p"), ("assistant", "r"))
    msgs = parse_item({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})
    assert msgs.turns == (("system", "s"), ("user", "u")) and msgs.kind == "text"
    assert parse_item({"prompt": "p", "response": "r"}).kind == "pair"
    # prompt+response wins over text: the dataset's text is just the pair already formatted.
    assert parse_item({"text": "t", "prompt": "p", "response": "r"}).kind == "pair"


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"text": "   \n"}, "text"),
        ({"text": ""}, "text"),
        ({"text": 5}, "text"),
        ({"text": "a\x00b"}, "text"),
        ({"prompt": "p", "response": ""}, "response"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": " "}]}, "messages[0].content"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"id": 1}, "item"),
        ([1, 2], "item"),
    ],
)
def test_invalid_items_name_the_field(obj: object, field: str) -> None:
    with pytest.raises(ItemError) as info:
        parse_item(obj)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_labels() -> None:
    assert parse_label({"label": 1}) == 1
    assert parse_label({}) is None
    for bad in (2, "1", True, 0.5):
        with pytest.raises(ItemError, match="label"):
            parse_label({"label": bad})


def test_plain_template_is_documented_form() -> None:
    fmt = make_formatter("plain", None)
    assert fmt(parse_item({"prompt": "P", "response": "R"})) == PLAIN_PAIR_TEMPLATE.format(prompt="P", response="R")
    assert fmt(parse_item({"text": "T"})) == "T"
    # "chat" without a chat template (encoders) falls back to plain.
    assert make_formatter("chat", None)(parse_item({"text": "T"})) == "T"
