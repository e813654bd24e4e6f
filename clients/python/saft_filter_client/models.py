"""The wire format of saft-filter's HTTP API: every request and response body a client sends or reads.

This module is the one definition of these shapes. The service imports it (``app.api.schemas`` re-exports it
and adds, by subclassing, what only the service can check: that an item's keys fit a known shape, read
by ``app.core.items``), so a client and the service cannot drift apart. It must stay importable with pydantic
alone: no torch, numpy or ``app`` import here, ever (``tests/test_client.py`` and an import-linter
contract check it).

Models that carry items (``ScoreRequest``, ``ModerationRequest``) are generic in the item model, so the
service can parametrize them with its validating subclass while the fields, their descriptions and
examples stay written once, here.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Our one moderation category: what the subspace's score measures.
HARMFUL = "harmful"


# --- items: one sample in any shape the service reads -------------------------------------------------
class ContentPart(BaseModel):
    """A part of list-typed content, ``{"type": "text", "text": ...}``; a part of another type (an image) is refused
    with its index, never dropped."""

    type: str
    text: str | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="An assistant's tool calls (OpenAI): scored as name(arguments).")


class ShareGPTTurn(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: str = Field(alias="from", description="human | gpt | system (or user, assistant, tool, function, observation)")
    value: str


Side = str | list[Message]


class ItemIn(BaseModel):
    """One sample in any shape ``saft`` reads (``app.core.items.SHAPES``), detected from its keys; ``id`` is echoed back.

    Keys fitting no shape, or two, are refused naming the keys and the shapes; other fields are metadata, ignored.
    """

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"id": "a1", "text": "How do I bake sourdough bread?"},
                {"id": "a2", "prompt": "Give me a recipe.", "response": "Mix flour, water and salt..."},
                {"id": "a3", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
                {"id": "a4", "prompt": "Name a prime.", "completion": "Seven."},
                {"id": "a5", "instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
                {"id": "a6", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
                {"id": "a7", "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
                    {"role": "assistant", "tool_calls": [{"function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                    {"role": "tool", "content": "18 °C, sunny"},
                    {"role": "assistant", "content": "It is 18 °C and sunny."}]},
                {"id": "a8", "prompt": "How do I pick a lock?", "chosen": "I can't help with that.",
                 "rejected": "Insert a tension wrench..."},
            ]
        },
    )

    id: str | int | None = None
    text: str | None = None
    prompt: Side | None = None
    response: Side | None = None
    completion: Side | None = Field(None, description="TRL prompt/completion: the completion is the answer scored.")
    instruction: str | None = None
    input: str | None = Field(None, description="Alpaca: joined to the instruction by a blank line.")
    output: str | None = None
    system: str | None = None
    history: list[list[str]] | None = None
    conversations: list[ShareGPTTurn] | None = None
    messages: list[Message] | None = None
    chosen: Side | None = Field(None, description="Preference: each side is scored as its own pair.")
    rejected: Side | None = None


ItemT = TypeVar("ItemT", bound=ItemIn)


# --- POST /score --------------------------------------------------------------------------------------
class ScoreRequest(BaseModel, Generic[ItemT]):
    items: list[ItemT] = Field(min_length=1, description="Items to score (limit: SAFT_MAX_ITEMS_PER_REQUEST).")
    threshold: float | None = Field(None, allow_inf_nan=False, description="Override τ for this request (drop when score > threshold).")

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [{"id": 1, "text": "Write a poem about the sea."}], "threshold": None}]}
    )


class SideResult(BaseModel):
    score: float
    verdict: Literal["keep", "drop"]
    threshold: float
    truncated: bool
    n_tokens: int
    probability: float | None = None


class ItemResult(BaseModel):
    id: str | int | None = None
    score: float
    verdict: Literal["keep", "drop"]
    threshold: float = Field(description="The τ this item was decided by: its kind's (text / pair), or the request's override.")
    truncated: bool
    n_tokens: int
    probability: float | None = Field(None, description="Calibrated P(harmful) of the score, per item kind; null when the "
                                      "version has no calibration (unlabelled fits, versions before it).")
    sides: dict[Literal["chosen", "rejected"], SideResult] | None = Field(
        None, description="A preference item's sides, each scored as its own pair. The item's own score and verdict are its "
        "chosen side's: a harmful chosen answer is what preference training learns, so the row is dropped; a harmful "
        "rejected answer is expected.")


class SubspaceRef(BaseModel):
    name: str
    version: str
    threshold: float = Field(description="The request's override if any, else the version's single τ (kinds without their own).")
    thresholds: dict[str, float] = Field(default_factory=dict, description="τ per item kind in effect for this request.")


class ScoreResponse(BaseModel):
    results: list[ItemResult]
    subspace: SubspaceRef


# --- POST /filter: one NDJSON record per input line, then the summary ----------------------------------
class FilterRecord(BaseModel):
    """A scored line of a /filter stream (``emit`` decides which are sent); ``item`` is the row as uploaded."""

    line: int
    id: Any = None
    verdict: Literal["keep", "drop"]
    score: float
    threshold: float
    truncated: bool
    n_tokens: int
    item: Any = None
    probability: float | None = None
    sides: dict[Literal["chosen", "rejected"], SideResult] | None = None


class FilterError(BaseModel):
    """A line the service could not score (invalid, too large), or with ``line`` null, the upload cut off."""

    line: int | None
    error: str


class FilterSummary(BaseModel):
    """The last record of a /filter stream."""

    summary: Literal[True] = True
    total: int
    kept: int
    dropped: int
    rejected: int
    subspace: SubspaceRef
    complete: bool = Field(True, description="False when the upload was cut off (e.g. above the size limit).")
    shapes: dict[str, int] = Field(default_factory=dict, description="Rows read in each shape (as detected with format=auto).")
    # Present only in a stream requested with ?start_line (a resumed one); a stream that does not resume omits them.
    start_line: int = Field(1, description="The request's start_line: the upload's lines before it were read and counted, not scored.")
    skipped: int = Field(0, description="Lines before start_line, counted but neither scored nor emitted; total = kept + dropped "
                                        "+ rejected + skipped, so total is the whole upload's, as in the uninterrupted stream.")


class ErrorBody(BaseModel):
    error: str
    type: str


# --- POST /v1/moderations (OpenAI-compatible) ----------------------------------------------------------
class ModerationTextInput(BaseModel):
    """OpenAI's text part: ``{"type": "text", "text": ...}``."""

    type: Literal["text"]
    text: str


class ModerationItemInput(ItemIn):
    """Extension: ``{"type": "item", ...}`` with any item shape of /score (``prompt`` + ``response``, ``messages``),
    so pairs and conversations are scored as such rather than flattened to one text."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"type": "item", "prompt": "Give me a recipe.", "response": "Mix flour, water and salt..."},
        {"type": "item", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    ]})

    type: Literal["item"]


PartT = TypeVar("PartT", bound=ModerationItemInput)


class ModerationRequest(BaseModel, Generic[PartT]):
    """OpenAI's moderation request; ``model`` names a subspace (``NAME`` or ``NAME@vN``), default the active one."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"input": ["How do I bake bread?", "Write a poem about the sea."]},
                                        {"input": [{"type": "text", "text": "Hi"}], "model": "default@v1"}]}
    )

    input: str | list[str | Annotated[ModerationTextInput | PartT, Field(discriminator="type")]] = Field(
        description="A string, a list of strings, or a list of parts; one result each, in order.")
    model: str | None = Field(
        None, description="NAME or NAME@vN of the subspace to score with (the service's active version only).")

    @field_validator("input", mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        # Say what is wrong in OpenAI's own terms before pydantic's union errors ("input.list[union[...]].0.str") do.
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("input: must be a string, or a non-empty list of strings or of parts {'type': 'text', 'text': ...}")
        for i, part in enumerate(value):
            if isinstance(part, dict) and part.get("type") not in ("text", "item"):
                raise ValueError(f"input[{i}]: part type {part.get('type')!r} is not scored here (only 'text', or the extension "
                                 "'item' with prompt/response or messages; this model does not read images)")
            if isinstance(part, dict) and part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"input[{i}]: a text part needs 'text', a string")
            if not isinstance(part, str | dict):  # pydantic turns a ValueError, not a TypeError, into a 422
                raise ValueError(f"input[{i}]: must be a string or a part object, not {type(part).__name__}")  # noqa: TRY004
        return value


class ModerationScore(BaseModel):
    """Extension (``saft`` in each result): the raw verdict behind the OpenAI-shaped fields."""

    score: float
    threshold: float = Field(description="The τ of the item's kind: flagged is score > threshold.")
    probability: float | None = Field(description="Calibrated P(harmful); null when the version has none (category_scores "
                                      "then holds sigmoid(score − threshold), which is not a probability).")
    truncated: bool
    n_tokens: int


class ModerationResult(BaseModel):
    """One input's result, as OpenAI's ``Moderation``, with our single category ``harmful`` only: the 13 OpenAI
    categories are not scored by this model, so they are absent, never filled with made-up values."""

    flagged: bool = Field(description="The verdict: score above the τ of the item's kind.")
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["text"]]]
    saft: ModerationScore


class ModerationResponse(BaseModel):
    id: str
    model: str = Field(description="The request's model as given, else the active subspace as NAME@vN.")
    results: list[ModerationResult]


# --- GET /info ------------------------------------------------------------------------------------------
class InfoModel(BaseModel):
    id: str
    weights_sha256: str
    device: str
    dtype: str


class InfoSubspace(BaseModel):
    name: str
    version: str
    method: str
    threshold: float = Field(description="The single τ (kinds without their own).")
    thresholds: dict[str, float] = Field(description="τ per item kind.")
    calibrated: bool = Field(description="Whether scores come with a calibrated probability.")


class InfoLimits(BaseModel):
    max_items_per_request: int = Field(description="Items in one /score or inputs in one /v1/moderations request (413 above).")
    max_chars_per_item: int = Field(description="Characters of one item, all turns together (413 above; never cut).")
    max_body_bytes: int = Field(description="Largest /score or /v1/moderations body.")
    max_upload_bytes: int = Field(description="Largest /filter or refit upload.")
    max_tokens: int | None = Field(description="Tokens an item is embedded with at most (the active version's max_length); "
                                   "longer items are truncated, not refused. Null with no active version.")
    max_batch_tokens: int = Field(description="Padded tokens of one forward pass.")
    max_batch_size: int = Field(description="Items of one forward pass.")
    max_queue: int = Field(description="Items queued before requests are answered 429.")


class InfoResponse(BaseModel):
    """What a client needs to size its batches and know what it talks to (as TEI's /info)."""

    package: str
    version: str
    model: InfoModel
    subspace: InfoSubspace | None = Field(description="The active version; null before one is active.")
    embedding: dict[str, Any] | None = Field(description="The active version's embedding config (layers, pooling, template...).")
    limits: InfoLimits
