"""POST /v1/moderations: OpenAI's moderation API over the same scoring path as /score.

Owns: translating OpenAI's request into items and the facade's results into OpenAI's response (the category score:
the result's probability, else ``app.core.calibration.squash`` of its score and τ). Must not: embed, score or decide
verdicts (``ScoringService.score`` does), or limit and rate-check otherwise than /score (the same facade checks).

Same auth, limits, batching and metrics as /score (it calls the facade's ``score``). One category,
``harmful``: ``flagged`` is the verdict (score > τ of the item's kind), its score the calibrated
probability. OpenAI's 13 categories are not returned: this model does not score them, and the openai
SDK parses a response without them (it validates only with ``_strict_response_validation=True``,
which nothing but made-up values could satisfy). See tests/test_moderations_info.py.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends

from app.api.deps import get_service, require_client
from app.api.errors import PayloadTooLarge
from app.api.schemas import HARMFUL, ModerationRequest, ModerationResponse, ModerationResult, ModerationScore
from app.core.calibration import squash
from app.core.pipeline import Scored
from app.serving.service import ScoringService

router = APIRouter(tags=["openai"], dependencies=[Depends(require_client)])


def _result(r: Scored) -> ModerationResult:
    # Without a calibration the score is squashed (0.5 at τ), so a reader of category_scores alone still ranks right.
    harmful = r.probability if r.probability is not None else squash(r.score, r.threshold)
    return ModerationResult(
        flagged=r.verdict == "drop",
        categories={HARMFUL: r.verdict == "drop"},
        category_scores={HARMFUL: harmful},
        category_applied_input_types={HARMFUL: ["text"]},
        saft=ModerationScore(score=r.score, threshold=r.threshold, probability=r.probability, truncated=r.truncated,
                             n_tokens=r.n_tokens),
    )


@router.post("/v1/moderations", response_model=ModerationResponse,
             summary="OpenAI-compatible moderation: one result per input, category 'harmful'")
async def moderations(body: ModerationRequest, service: ScoringService = Depends(get_service),
                      caller: str = Depends(require_client)) -> ModerationResponse:
    items = body.to_items()
    limit = service.settings.max_items_per_request
    if len(items) > limit:
        raise PayloadTooLarge(f"input: {len(items)} inputs exceed the limit of {limit} per request")
    for i, item in enumerate(items):
        service.check_size(item, f"input[{i}]")
    service.check_rate(caller, len(items))
    snapshot = service.snapshot(body.model)
    results = await service.score(items, snapshot, None, caller=caller)
    m = snapshot.manifest
    return ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=body.model or f"{m.name}@{m.version}",
                              results=[_result(r) for r in results])
