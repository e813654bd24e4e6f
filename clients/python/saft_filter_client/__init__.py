"""saft-filter-client: a light client for a saft-filter service (httpx, pydantic and tenacity; no torch).

``SaftClient`` (threads) and ``AsyncSaftClient`` (asyncio) score items chunked to the service's ``/info``
limits, retry what is worth retrying, stream ``/filter`` and call ``/v1/moderations``. The models in
``saft_filter_client.models`` are the service's request and response bodies, the same classes it serves.
"""

from saft_filter_client.client import AsyncSaftClient, Record, SaftClient, Scored
from saft_filter_client.errors import ItemRefused, Overloaded, SaftError, Unavailable
from saft_filter_client.models import (
    FilterError,
    FilterRecord,
    FilterSummary,
    InfoResponse,
    ItemIn,
    ItemResult,
    ModerationResponse,
)
from saft_filter_client.retry import RetryPolicy

__version__ = "0.1.0"
__all__ = [
    "AsyncSaftClient", "FilterError", "FilterRecord", "FilterSummary", "InfoResponse", "ItemIn", "ItemRefused", "ItemResult",
    "ModerationResponse", "Overloaded", "Record", "RetryPolicy", "SaftClient", "SaftError", "Scored", "Unavailable",
]
