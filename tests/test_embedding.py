"""Embeddings from the real default model (and the shipped encoder): invariance, layers, truncation."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.embedding import EMBEDDED_DECODER, BatchLimits, Embedder, EmbeddingConfig, EmbeddingError, resolve_model_dir
from app.core.items import parse_item


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embedding_does_not_depend_on_batch(embedder: Embedder, calibration_rows: list[dict], pooling: str) -> None:
    config = EmbeddingConfig(layers=(-1, 12), pooling=pooling, max_length=128)  # type: ignore[arg-type]
    encoded = embedder.encode_items([parse_item(r) for r in calibration_rows[:12]], config)
    lengths = sorted(len(e.input_ids) for e in encoded)
    assert lengths[0] < lengths[-1] / 2, "the batch must mix short and long texts"
    together = embedder.forward(encoded, config)  # one padded batch of mixed lengths
    for i, enc in enumerate(encoded):
        alone = embedder.forward([enc], config)[0]
        assert _rel(together[i], alone) < 1e-4


def test_a_decoder_pass_without_the_padding_mask_gives_the_masked_vectors(embedder: Embedder,
                                                                        calibration_rows: list[dict]) -> None:
    # Right padding and causal attention: no real token sees the padding, so the mask can be left to SDPA's is_causal.
    config = EmbeddingConfig(layers=(4, 16), pooling="mean", max_length=128)
    encoded = embedder.encode_items([parse_item(r) for r in calibration_rows[:6]], config)
    assert len({len(e.input_ids) for e in encoded}) > 1, "the batch must be padded"
    assert embedder.mask_padding is False  # the decoder's default
    unmasked = embedder.forward(encoded, config)
    embedder.mask_padding = True
    try:
        masked = embedder.forward(encoded, config)
    finally:
        embedder.mask_padding = False
    for a, b in zip(unmasked, masked, strict=True):
        assert _rel(a, b) < 1e-4


def test_encoder_batch_invariance_and_dim(encoder: Embedder, calibration_rows: list[dict]) -> None:
    config = EmbeddingConfig(layers=(-1,), pooling="mean", template="plain", max_length=128, truncation_side="right")
    encoded = encoder.encode_items([parse_item(r) for r in calibration_rows[:8]], config)
    assert encoder.mask_padding is True  # bidirectional: without the mask, real tokens would attend to the padding
    together = encoder.forward(encoded, config)
    assert together.shape == (8, 384)
    for i, enc in enumerate(encoded):
        assert _rel(together[i], encoder.forward([enc], config)[0]) < 1e-4


def test_only_needed_layers_run_and_match_full_model(embedder: Embedder) -> None:
    enc = embedder.encode(["The quick brown fox jumps over the lazy dog."], EmbeddingConfig())
    ran: list[int] = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(embedder._blocks)]
    try:
        mine = embedder.forward(enc, EmbeddingConfig(layers=(5, 0, 3)))
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1, 2, 3, 4], "blocks beyond the deepest requested layer must not run"
    with torch.inference_mode():
        full = embedder.model(input_ids=torch.tensor([enc[0].input_ids]), output_hidden_states=True).hidden_states
    expected = np.concatenate([full[i][0, -1].numpy() for i in (5, 0, 3)])
    assert _rel(mine[0], expected) < 1e-5


def test_a_pass_paused_at_its_checkpoint_while_another_pass_runs_keeps_both_vectors(embedder: Embedder,
                                                                                   calibration_rows: list[dict]) -> None:
    """The service's overtaking: a batch's pass waits at a checkpoint (after a block) while another thread runs a whole
    pass of other items through the same model; the block hooks act per thread, so both get exactly the vectors
    they get alone, and the paused pass calls its checkpoint once after every block before the deepest."""
    config = EmbeddingConfig(layers=(-1, 6), max_length=256)
    long = embedder.encode_items([parse_item(r) for r in calibration_rows[:4]], config)
    short = embedder.encode(["How do I bake bread?"], config)
    alone_long, alone_short = embedder.forward(long, config), embedder.forward(short, config)
    calls = 0
    overtaking: dict[str, np.ndarray] = {}

    def checkpoint() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # inside the long pass: run the short one to its end in another thread, then go on
            thread = threading.Thread(target=lambda: overtaking.setdefault("short", embedder.forward(short, config)))
            thread.start()
            thread.join()

    paused_long = embedder.forward(long, config, checkpoint=checkpoint)
    deepest = max(embedder.normalize_layers(config.layers))
    assert calls == deepest - 1
    np.testing.assert_allclose(paused_long, alone_long, rtol=0, atol=1e-5)
    np.testing.assert_allclose(overtaking["short"], alone_short, rtol=0, atol=1e-5)


def test_negative_layers_and_range(embedder: Embedder) -> None:
    assert embedder.normalize_layers([-1, 0, -31]) == (30, 0, 0)
    with pytest.raises(EmbeddingError, match="layer 31 is out of range"):
        embedder.normalize_layers([31])
    with pytest.raises(EmbeddingError, match="layer -32"):
        embedder.normalize_layers([-32])


def test_truncation_is_reported_and_keeps_the_chosen_side(embedder: Embedder) -> None:
    text = " ".join(f"word{i}" for i in range(400))
    left = embedder.encode([text], EmbeddingConfig(max_length=32, truncation_side="left"))[0]
    right = embedder.encode([text], EmbeddingConfig(max_length=32, truncation_side="right"))[0]
    full = embedder.encode([text], EmbeddingConfig(max_length=4096))[0]
    assert left.truncated and right.truncated and not full.truncated
    assert left.n_tokens == right.n_tokens == full.n_tokens > 32
    assert left.input_ids == full.input_ids[-32:] and right.input_ids == full.input_ids[:32]


def test_chat_template_formats_pairs(embedder: Embedder) -> None:
    text = embedder.formatter("chat")(parse_item({"prompt": "How do I bake bread?", "response": "Mix flour."}))
    assert "<|im_start|>user\nHow do I bake bread?<|im_end|>" in text
    assert "<|im_start|>assistant\nMix flour.<|im_end|>" in text


def test_default_model_is_converted_once(embedder: Embedder, tmp_path: Path) -> None:
    from app.config import get_settings

    cache = get_settings().model_cache_dir
    first = resolve_model_dir(EMBEDDED_DECODER, cache)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(EMBEDDED_DECODER, cache) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp, "a second start must not convert again"
    assert not list(cache.glob(".convert-*")), "no half-written conversion may remain"
    assert embedder.dtype == torch.float32 and embedder.device.type == "cpu"


def test_a_gguf_file_is_a_model_converted_once_by_its_digest(embedder: Embedder) -> None:
    from app.config import get_settings
    from app.core.embedding import _GGUF_FILE, _GGUF_PACKAGE, _package_dir

    cache = get_settings().model_cache_dir
    embedded = resolve_model_dir(EMBEDDED_DECODER, cache)
    gguf = _package_dir(_GGUF_PACKAGE) / _GGUF_FILE
    # The shipped GGUF named by its path is the same bytes: the conversion already in the cache answers for it.
    assert resolve_model_dir(str(gguf), cache) == embedded
    assert not list(cache.glob(".convert-*"))


def test_refuses_pickle_only_and_missing_directories(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(EmbeddingError, match="no \\*.safetensors"):
        resolve_model_dir(str(tmp_path), tmp_path)
    with pytest.raises(EmbeddingError, match="neither an embedded model"):
        resolve_model_dir(str(tmp_path / "nope"), tmp_path)


def test_local_directory_loads_like_the_embedded_default(embedder: Embedder) -> None:
    from app.config import get_settings

    path = resolve_model_dir(EMBEDDED_DECODER, get_settings().model_cache_dir)
    local = Embedder.load(str(path))
    assert local.weights_digest == embedder.weights_digest
    enc = local.encode(["hello there"], EmbeddingConfig())
    assert _rel(local.forward(enc, EmbeddingConfig()), embedder.forward(enc, EmbeddingConfig())) < 1e-6


def test_batch_plan_respects_budget_and_covers_all() -> None:
    lengths = [5, 300, 40, 41, 7, 1000, 3]
    batches = BatchLimits(max_batch_tokens=100, max_batch_size=2).plan(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 2
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 100
