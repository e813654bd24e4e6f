"""Sample shapes as fine-tuning sets store them: each one reads to the same canonical turns, and a row that fits no
shape, or two, is refused with the keys it has and the shapes saft knows — never guessed, never half scored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.core.items import (
    JUDGE_TEMPLATE,
    PLAIN_PAIR_TEMPLATE,
    SHAPES,
    ItemError,
    detect_shape,
    make_formatter,
    parse_columns,
    parse_item,
    split_preference,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

PAIR = (("user", "How do I bake bread?"), ("assistant", "Mix flour, water and yeast."))


@pytest.mark.parametrize(
    ("obj", "shape", "turns"),
    [
        ({"text": "hi"}, "text", (("user", "hi"),)),
        ({"prompt": "hi"}, "prompt", (("user", "hi"),)),
        ({"prompt": "hi", "text": "hi", "id": 3}, "prompt", (("user", "hi"),)),
        ({"prompt": PAIR[0][1], "response": PAIR[1][1]}, "prompt_response", PAIR),
        ({"prompt": PAIR[0][1], "completion": PAIR[1][1]}, "prompt_completion", PAIR),
        (
            {"prompt": [{"role": "user", "content": PAIR[0][1]}], "completion": [{"role": "assistant", "content": PAIR[1][1]}]},
            "prompt_completion",
            PAIR,
        ),
        (
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}],
             "completion": [{"role": "assistant", "content": "a"}]},
            "prompt_completion",
            (("system", "Be brief."), ("user", "q"), ("assistant", "a")),
        ),
        ({"prompt": [{"role": "user", "content": "q"}]}, "prompt", (("user", "q"),)),
        ({"instruction": PAIR[0][1], "input": "", "output": PAIR[1][1]}, "alpaca", PAIR),
        ({"instruction": PAIR[0][1], "output": PAIR[1][1]}, "alpaca", PAIR),
        (
            {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
            "alpaca",
            (("user", "Translate to French.\n\nGood morning"), ("assistant", "Bonjour")),
        ),
        (
            {"instruction": "And now?", "output": "Bonsoir", "system": "You translate.", "history": [["Good morning", "Bonjour"]]},
            "alpaca",
            (("system", "You translate."), ("user", "Good morning"), ("assistant", "Bonjour"), ("user", "And now?"),
             ("assistant", "Bonsoir")),
        ),
        (
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
            "sharegpt",
            (("system", "s"), ("user", "u"), ("assistant", "a")),
        ),
        (
            {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}], "system": "s"},
            "sharegpt",
            (("system", "s"), ("user", "u"), ("assistant", "a")),
        ),
        (
            {"conversations": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
            "sharegpt",
            (("user", "u"), ("assistant", "a")),
        ),
        (
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "text": "<rendered>"},
            "messages",
            (("user", "u"), ("assistant", "a")),
        ),
        # ultrachat_200k keeps the first request beside the conversation as ``prompt``: the conversation is the sample.
        ({"prompt": "u", "prompt_id": "x1", "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
         "messages", (("user", "u"), ("assistant", "a"))),
        # A dataset's ``text`` beside a structured shape is that sample pre-formatted (tatsu-lab/alpaca does this).
        ({"instruction": "i", "output": "o", "text": "### Instruction: i ..."}, "alpaca", (("user", "i"), ("assistant", "o"))),
        # Nulls are absent keys: table exports write them for every column a row lacks.
        ({"text": "t", "prompt": "t", "response": None, "completion": None}, "prompt", (("user", "t"),)),
    ],
)
def test_every_shape_reads_to_canonical_turns(obj: dict, shape: str, turns: tuple) -> None:
    assert detect_shape(obj) == shape
    item = parse_item(obj)
    assert item.turns == turns
    assert item.kind == ("pair" if any(role == "assistant" for role, _ in turns) else "text")
    assert parse_item(obj, shape=shape).turns == turns  # naming the shape reads the same


def test_tool_turns_and_tool_calls() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny."},
    ]
    expected = (
        ("user", "Weather in Paris?"),
        ("assistant", 'weather({"city": "Paris"})'),
        ("tool", "18C, sunny"),
        ("assistant", "It is 18C and sunny."),
    )
    assert parse_item({"messages": messages}).turns == expected
    sharegpt = [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": 'weather({"city": "Paris"})'},
        {"from": "observation", "value": "18C, sunny"},
        {"from": "gpt", "value": "It is 18C and sunny."},
    ]
    assert parse_item({"conversations": sharegpt}).turns == expected
    # Structured arguments are kept as JSON; a call with text beside it keeps both.
    item = parse_item({"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "Calling.",
                                     "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}]})
    assert item.turns[1] == ("assistant", 'Calling.\nf({"x":1})')


def test_every_template_renders_tool_turns() -> None:
    item = parse_item({"messages": [{"role": "user", "content": "u"}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "a"}]})
    assert make_formatter("plain", None)(item) == "user: u\n\ntool: 42\n\nassistant: a"
    assert make_formatter("judge", None)(item) == JUDGE_TEMPLATE.format(content="User: u\n\nTool: 42\n\nAssistant: a")
    seen: list = []

    def chat(messages: Any, add_generation_prompt: bool) -> str:
        seen.append((list(messages), add_generation_prompt))
        return "rendered"

    assert make_formatter("chat", chat)(item) == "rendered"
    assert seen == [([{"role": "user", "content": "u"}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "a"}], False)]


def test_list_content_joins_text_parts() -> None:
    content = [{"type": "text", "text": "Describe this recipe:"}, {"type": "text", "text": "flour, water"}]
    item = parse_item({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": "Bread."}]}]})
    assert item.turns == (("user", "Describe this recipe:\nflour, water"), ("assistant", "Bread."))
    assert item.kind == "pair"


@pytest.mark.parametrize(
    ("obj", "field", "words"),
    [
        ({"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[1].content[1].type", "'image_url'"),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0].type", "missing"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text", "int"),
        ({"messages": [{"role": "user", "content": ["bare string"]}]}, "messages[0].content[0]", "str"),
        ({"messages": [{"role": "user", "content": {"type": "text"}}]}, "messages[0].content", "dict"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "  "}]}]}, "messages[0].content", "empty"),
        ({"prompt": [{"role": "user", "content": [{"type": "input_audio"}]}], "completion": "c"}, "prompt[0].content[0].type", "input_audio"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from", "'robot'"),
        ({"conversations": [{"from": "human"}]}, "conversations[0].value", "missing"),
        ({"conversations": []}, "conversations", "non-empty"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}]},
         "messages[0].tool_calls[0].function.name", "string"),
        ({"instruction": "i", "input": 5, "output": "o"}, "input", "int"),
        ({"instruction": "i", "output": "o", "history": [["only one"]]}, "history[0]", "pair"),
        ({"prompt": "p", "completion": " "}, "completion", "empty"),
    ],
)
def test_parts_that_cannot_be_scored_are_refused_by_field(obj: dict, field: str, words: str) -> None:
    with pytest.raises(ItemError) as info:
        parse_item(obj)
    assert info.value.field == field
    assert words in info.value.message


@pytest.mark.parametrize(
    ("obj", "shapes"),
    [
        ({"messages": [{"role": "user", "content": "u"}], "conversations": [{"from": "human", "value": "u"}]}, "messages, sharegpt"),
        ({"prompt": "p", "response": "r", "completion": "c"}, "prompt_completion, prompt_response"),
        ({"instruction": "i", "output": "o", "prompt": "p", "response": "r"}, "alpaca, prompt_response"),
        ({"instruction": "i", "context": "c", "response": "r"}, "alpaca, prompt_response"),  # Dolly: needs columns
        ({"prompt": "p", "response": "r", "chosen": "a", "rejected": "b"}, "preference, prompt_response"),
    ],
)
def test_rows_fitting_two_shapes_are_refused(obj: dict, shapes: str) -> None:
    with pytest.raises(ItemError) as info:
        parse_item(obj)
    assert info.value.field == "item"
    assert f"keys {sorted(obj)}" in info.value.message
    assert f"({shapes})" in info.value.message
    assert "alpaca {instruction, [input], output" in info.value.message  # the shapes saft knows
    with pytest.raises(ItemError):
        detect_shape(obj)


def test_rows_fitting_no_shape_name_their_keys_and_the_known_shapes() -> None:
    with pytest.raises(ItemError) as info:
        parse_item({"question": "q", "answer": "a", "id": 7})
    assert info.value.field == "item"
    assert "keys ['answer', 'id', 'question'] fit no known shape" in info.value.message
    for shape in SHAPES:
        assert f"{shape} {{" in info.value.message
    assert "columns" in info.value.message


@pytest.mark.parametrize(
    ("obj", "field", "words"),
    [
        ({"instruction": "i"}, "output", "alpaca"),  # never the instruction alone
        ({"output": "o"}, "instruction", "alpaca"),
        ({"completion": "c"}, "prompt", "prompt_completion"),
        ({"response": "r", "text": "t"}, "prompt", "prompt_response"),
        ({"prompt": "p", "answer": "a"}, "answer", "response=answer"),  # an answer no shape reads is not dropped
        ({"text": "t", "reply": "r"}, "reply", "response=reply"),
        ({"text": "one", "prompt": "another"}, "text", "shape='prompt'"),
        ({"chosen": "a"}, "rejected", "preference"),
    ],
)
def test_half_a_shape_is_refused_not_scored_in_part(obj: dict, field: str, words: str) -> None:
    with pytest.raises(ItemError) as info:
        parse_item(obj)
    assert info.value.field == field
    assert words in info.value.message


def test_an_explicit_shape_reads_only_its_keys() -> None:
    row = {"text": "### Instruction:\np\n\n### Response:\nr", "prompt": "p", "response": "r"}
    assert parse_item(row).turns == (("user", "p"), ("assistant", "r"))
    assert parse_item(row, shape="text").turns == (("user", row["text"]),)
    assert parse_item(row, shape="prompt").turns == (("user", "p"),)
    assert parse_item({"text": "one", "prompt": "another"}, shape="text").turns == (("user", "one"),)
    with pytest.raises(ItemError) as info:
        parse_item(row, shape="alpaca")
    assert info.value.field == "instruction"
    with pytest.raises(ItemError) as info:
        parse_item(row, shape="csv")  # type: ignore[arg-type]
    assert info.value.field == "shape" and "prompt_completion" in info.value.message


def test_parse_columns() -> None:
    assert parse_columns("prompt=question,response=answer") == {"prompt": "question", "response": "answer"}
    assert parse_columns(" prompt = question , ") == {"prompt": "question"}
    assert parse_columns("") == {}
    for bad, words in [
        ("prompt", "field=key"), ("=question", "field=key"), ("prompt=", "field=key"), ("prompt=a=b", "field=key"),
        ("query=question", "not a field"), ("prompt=a,prompt=b", "mapped twice"), ("prompt=a,response=a", "mapped twice"),
    ]:
        with pytest.raises(ItemError) as info:
            parse_columns(bad)
        assert info.value.field == "columns"
        assert words in info.value.message


def test_columns_rename_before_detection_and_errors_name_the_users_key() -> None:
    columns = parse_columns("prompt=question,response=answer")
    row = {"question": "How do I bake bread?", "answer": "Mix flour, water and yeast.", "source": "faq"}
    assert detect_shape(row, columns) == "prompt_response"
    assert parse_item(row, columns=columns).turns == PAIR
    # A mapped field no longer reads its own key: here the "prompt" column is metadata, not the prompt.
    assert parse_item({**row, "prompt": "system prompt v2"}, columns=columns).turns == PAIR
    with pytest.raises(ItemError) as info:
        parse_item({"question": "q", "answer": " "}, columns=columns)
    assert (info.value.field, info.value.message) == ("answer", "is empty or whitespace only")
    dolly = {"instruction": "Summarize.", "context": "Bread is old.", "response": "Old food."}
    dolly_columns = parse_columns("input=context,output=response")
    assert parse_item(dolly, columns=dolly_columns).turns == (("user", "Summarize.\n\nBread is old."), ("assistant", "Old food."))
    assert parse_item({"prompt": "r", "response": "p"}, columns={"prompt": "response", "response": "prompt"}).turns == (
        ("user", "p"), ("assistant", "r"))
    with pytest.raises(ItemError) as info:
        parse_item(row, columns={"query": "question"})
    assert info.value.field == "columns"


def test_preference_rows_split_into_two_pairs() -> None:
    row = {"prompt": "How do I bake bread?", "chosen": "Mix flour, water and yeast.", "rejected": "Buy it.", "id": 1}
    assert detect_shape(row) == "preference"
    with pytest.raises(ItemError) as info:
        parse_item(row)
    assert info.value.field == "item" and "split_preference" in info.value.message
    sides = split_preference(row)
    assert sides == [
        ("chosen", {"prompt": "How do I bake bread?", "response": "Mix flour, water and yeast."}),
        ("rejected", {"prompt": "How do I bake bread?", "response": "Buy it."}),
    ]
    assert [parse_item(fields).turns for _, fields in sides] == [PAIR, (PAIR[0], ("assistant", "Buy it."))]

    conversational = {
        "prompt": [{"role": "user", "content": "How do I bake bread?"}],
        "chosen": [{"role": "assistant", "content": "Mix flour, water and yeast."}],
        "rejected": [{"role": "assistant", "content": "Buy it."}],
    }
    assert [parse_item(fields).turns for _, fields in split_preference(conversational)] == [PAIR, (PAIR[0], ("assistant", "Buy it."))]
    implicit = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}
    assert split_preference(implicit) == [("chosen", {"messages": implicit["chosen"]}), ("rejected", {"messages": implicit["rejected"]})]

    with pytest.raises(ItemError) as info:
        split_preference({"prompt": "p", "chosen": "a", "rejected": ""})
    assert (info.value.field, info.value.message) == ("rejected", "is empty or whitespace only")
    with pytest.raises(ItemError) as info:
        split_preference({"chosen": [{"role": "user", "content": [{"type": "image_url"}]}], "rejected": "x"})
    assert info.value.field == "chosen[0].content[0].type"
    assert split_preference({"q": "p", "better": "a", "worse": "b"}, columns=parse_columns("prompt=q,chosen=better,rejected=worse"))[1] == (
        "rejected", {"prompt": "p", "response": "b"})
    with pytest.raises(ItemError) as info:
        split_preference({"q": "p", "better": " ", "worse": "b"}, columns=parse_columns("prompt=q,chosen=better,rejected=worse"))
    assert info.value.field == "better"


def _reshaped(prompt: str, response: str) -> dict[str, dict]:
    return {
        "alpaca": {"instruction": prompt, "input": "", "output": response},
        "sharegpt": {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": response}]},
        "prompt_completion": {"prompt": prompt, "completion": response},
        "trl_conversational": {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": response}]},
        "messages": {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]},
        "messages_parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]},
                                        {"role": "assistant", "content": [{"type": "text", "text": response}]}]},
    }


def test_real_pairs_read_alike_in_every_shape(calibration_rows: list[dict]) -> None:
    pairs = [r for r in calibration_rows if r["kind"] == "pair"]
    assert len(pairs) >= 20
    for row in pairs:
        canonical = parse_item({"prompt": row["prompt"], "response": row["response"]})
        assert canonical.turns == (("user", row["prompt"]), ("assistant", row["response"]))
        assert parse_item(row).turns == canonical.turns  # the stored row, text and metadata and all
        for name, obj in _reshaped(row["prompt"], row["response"]).items():
            assert parse_item({**obj, "id": row["id"], "label": row["label"]}).turns == canonical.turns, name
        fmt = make_formatter("plain", None)
        assert fmt(parse_item(_reshaped(row["prompt"], row["response"])["alpaca"])) == PLAIN_PAIR_TEMPLATE.format(
            prompt=row["prompt"], response=row["response"])


def test_shared_data_reads_as_it_did() -> None:
    """Every line of ../shared/data: ``prompt`` + ``response`` is the pair, otherwise the text is the request."""
    counts = {"pair": 0, "text": 0, "refused": 0}
    kinds = {"pair": "pair", "prompt": "text", "text": "text"}
    for name in ("calibration", "dev_eval", "extra_sources"):
        with (DATA_DIR / f"{name}.jsonl").open() as fh:
            for line in fh:
                row = json.loads(line)
                if "response" in row:
                    expected = (("user", row["prompt"]), ("assistant", row["response"]))
                else:
                    expected = (("user", row["text"]),)
                if not all(content.strip() for _, content in expected):  # a few pairs have an empty response
                    with pytest.raises(ItemError) as info:
                        parse_item(row)
                    assert info.value.field == "response"
                    counts["refused"] += 1
                    continue
                item = parse_item(row)
                assert item.turns == expected, row["id"]
                counts[item.kind] += 1
                assert kinds[row["kind"]] == item.kind, row["id"]
    assert counts == {"pair": 6386, "text": 11239, "refused": 4}
