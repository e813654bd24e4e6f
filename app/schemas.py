"""Every pydantic request and response body of the HTTP API (as vLLM's protocol.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.items import Item, ItemError, parse_item


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ItemIn(BaseModel):
    """One sample: ``text``, or ``prompt`` + ``response``, or ``messages``; ``id`` is echoed back."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"id": "a1", "text": "How do I bake sourdough bread?"},
                {"id": "a2", "prompt": "Give me a recipe.", "response": "Mix flour, water and salt..."},
                {"id": "a3", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
            ]
        },
    )

    id: str | int | None = None
    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: list[Message] | None = None

    @model_validator(mode="after")
    def _valid(self) -> ItemIn:
        self.to_item()
        return self

    def to_item(self) -> Item:
        try:
            return parse_item(self.model_dump(exclude_none=True, include={"text", "prompt", "response", "messages"}))
        except ItemError as err:
            raise ValueError(str(err)) from None


class ScoreRequest(BaseModel):
    items: list[ItemIn] = Field(min_length=1, description="Items to score (limit: SAFT_MAX_ITEMS_PER_REQUEST).")
    threshold: float | None = Field(None, allow_inf_nan=False, description="Override τ for this request (drop when score > threshold).")

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [{"id": 1, "text": "Write a poem about the sea."}], "threshold": None}]}
    )


class ItemResult(BaseModel):
    id: str | int | None = None
    score: float
    verdict: Literal["keep", "drop"]
    threshold: float = Field(description="The τ this item was decided by: its kind's (text / pair), or the request's override.")
    truncated: bool
    n_tokens: int


class SubspaceRef(BaseModel):
    name: str
    version: str
    threshold: float = Field(description="The request's override if any, else the version's single τ (kinds without their own).")
    thresholds: dict[str, float] = Field(default_factory=dict, description="τ per item kind in effect for this request.")


class ScoreResponse(BaseModel):
    results: list[ItemResult]
    subspace: SubspaceRef


class FilterSummary(BaseModel):
    """The last record of a /filter stream."""

    summary: Literal[True] = True
    total: int
    kept: int
    dropped: int
    rejected: int
    subspace: SubspaceRef
    complete: bool = Field(True, description="False when the upload was cut off (e.g. above the size limit).")


class ErrorBody(BaseModel):
    error: str
    type: str


class RefitAccepted(BaseModel):
    job_id: str
    status: str


class JobState(BaseModel):
    job_id: str
    name: str
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: dict[str, int] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    version: str | None = None
    activated: bool = False
    quality: dict[str, Any] | None = None
    rejected: dict[str, Any] | None = Field(None, description="Invalid calibration lines: count and the first 100 with reasons.")
    error: str | None = None
    replica: str | None = Field(None, description="The replica running the job (in a fleet).")
    created_at: float
    finished_at: float | None = None


class SubspaceInfo(BaseModel):
    name: str
    version: str
    active: bool
    manifest: dict[str, Any]


class VersionList(BaseModel):
    name: str
    active: str | None
    versions: list[str]
