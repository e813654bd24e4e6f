"""Every pydantic request and response body of the HTTP API (as vLLM's protocol.py).

The wire shapes are defined once, in the client package (``saft_filter_client.models``), and re-exported
here, so the service and its client cannot drift apart. What this module adds is what only the service
can check, by subclassing the item-carrying models: that an item's keys fit a known shape (``app.core.items``),
the parsed sample kept on the model for the route. The admin bodies (refit jobs, versions) have no client
and live here alone.

Owns: the service-side subclasses of the wire models and the admin bodies. Must not: redefine a wire shape the client
package defines, parse items otherwise than ``app.core.items`` does, or hold route logic.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, model_validator
from saft_filter_client import models as wire
from saft_filter_client.models import (
    HARMFUL,
    ContentPart,
    ErrorBody,
    FilterError,
    FilterRecord,
    FilterSummary,
    InfoLimits,
    InfoModel,
    InfoResponse,
    InfoSubspace,
    ItemResult,
    Message,
    ModerationResponse,
    ModerationResult,
    ModerationScore,
    ModerationTextInput,
    ScoreResponse,
    ShareGPTTurn,
    Side,
    SideResult,
    SubspaceRef,
)

from app.core.items import Item, ItemError, Sample, parse_item, parse_sample

__all__ = [
    "HARMFUL", "ContentPart", "ErrorBody", "FilterError", "FilterRecord", "FilterSummary", "InfoLimits", "InfoModel",
    "InfoResponse", "InfoSubspace", "ItemIn", "ItemResult", "JobState", "Message", "ModerationItemInput",
    "ModerationRequest", "ModerationResponse", "ModerationResult", "ModerationScore", "ModerationTextInput",
    "RefitAccepted", "ScoreRequest", "ScoreResponse", "ShareGPTTurn", "Side", "SideResult", "SubspaceInfo",
    "SubspaceRef", "VersionList",
]


class ItemIn(wire.ItemIn):
    # The schema's description is the wire model's (pydantic reads it from __doc__): same shape, same words.
    __doc__ = wire.ItemIn.__doc__

    _sample: Sample | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _valid(self) -> ItemIn:
        try:
            self._sample = parse_sample(self.model_dump(exclude_none=True, by_alias=True))
        except ItemError as err:
            raise ValueError(str(err)) from None
        return self

    @property
    def sample(self) -> Sample:
        """The item(s) to score: one, or a preference row's two sides."""
        assert self._sample is not None  # set by validation
        return self._sample

    def to_item(self) -> Item:
        """The one item of this sample; a preference row is two (use ``sample``) and is refused here."""
        if self.sample.sides:
            raise ItemError("item", "a preference row (chosen/rejected) is two samples; score it with /score, which "
                            "returns each side")
        return self.sample.item


class ScoreRequest(wire.ScoreRequest[ItemIn]):
    pass


class ModerationItemInput(wire.ModerationItemInput, ItemIn):
    __doc__ = wire.ModerationItemInput.__doc__
    # The wire model's config (its examples), not ItemIn's, which pydantic would merge in last from the bases.
    model_config = wire.ModerationItemInput.model_config


class ModerationRequest(wire.ModerationRequest[ModerationItemInput]):
    __doc__ = wire.ModerationRequest.__doc__

    @model_validator(mode="after")
    def _valid(self) -> ModerationRequest:
        for i, part in enumerate([self.input] if isinstance(self.input, str) else self.input):
            try:
                if isinstance(part, str | ModerationTextInput):
                    parse_item({"text": part if isinstance(part, str) else part.text})
                else:
                    part.to_item()  # one sample per result: a preference row (two) is refused
            except ItemError as err:
                raise ValueError(f"input[{i}]: {err}") from None
        return self

    def to_items(self) -> list[Item]:
        parts = [self.input] if isinstance(self.input, str) else self.input
        return [parse_item({"text": p if isinstance(p, str) else p.text}) if isinstance(p, str | ModerationTextInput)
                else p.to_item() for p in parts]


# --- admin bodies (no client) ----------------------------------------------------------------------------
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
    held: list[str] | None = Field(None, description="activate=auto: why the published version was not activated.")
    refit: dict[str, Any] | None = Field(None, description="The strategy, the version it started from, and both versions "
                                         "compared on the upload (the manifest's 'refit').")
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
