"""The service against what a user would write instead: a plain transformers loop over the same weights.

    python -m bench.run plain --n 96 --rounds 2

The loop (issue 17's yardstick): the same converted SmolLM2 weights through ``AutoModel`` in fp32, eager PyTorch (not
compiled; transformers' default SDPA attention), every layer run with ``output_hidden_states=True``, the chosen
layer's hidden states mean-pooled over the attention mask, the texts formatted with the model's chat template,
length-sorted batches of 4, cut at 512 tokens from the left. The service: ``saft serve`` on its committed default,
cache off, ``concurrency`` closed-loop clients sending one item per request. Both see fresh texts (each round its own
slice) and run alternately (loop, service, service, loop, ...) with the server up the whole time; the loop runs in
this process in a worker thread, as the core benchmarks do.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import torch
import typer

from bench.common import RESULTS, drive, in_worker_thread, public, saft_server, save, texts
from bench.service import ResultsOpt


class PlainLoop:
    """The loop a user writes with transformers, on the default subspace's model, layer and window."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        from app.config import get_settings
        from app.core.embedding import resolve_model_dir
        from app.store.artifacts import load_version

        settings = get_settings()
        _, manifest = load_version(settings.models_dir, settings.subspace_name)
        path = resolve_model_dir(manifest.model_id, settings.model_cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.truncation_side = "left"
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.layer = manifest.embedding.layers[0]
        self.max_length = manifest.embedding.max_length
        self.info = {"subspace": f"{manifest.name}/{manifest.version}", "layer": self.layer, "max_length": self.max_length,
                     "batch_size": 4, "pooling": "mean", "attention": self.model.config._attn_implementation}

    def _format(self, item: dict[str, Any]) -> str:
        messages = [{"role": "user", "content": item.get("text") or item["prompt"]}]
        if "response" in item:
            messages.append({"role": "assistant", "content": item["response"]})
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False))

    def rate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            start = time.perf_counter()
            formatted = [self._format(item) for item in items]
            order = sorted(range(len(formatted)), key=lambda i: len(self.tokenizer(formatted[i])["input_ids"]))
            with torch.inference_mode():
                for at in range(0, len(order), 4):
                    batch = [formatted[i] for i in order[at:at + 4]]
                    enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                         add_special_tokens=False, return_tensors="pt")
                    hidden = self.model(**enc, output_hidden_states=True).hidden_states[self.layer]
                    mask = enc["attention_mask"].unsqueeze(-1).float()
                    (hidden * mask).sum(1) / mask.sum(1)
            seconds = time.perf_counter() - start
            return {"seconds": round(seconds, 3), "texts_per_s": round(len(items) / seconds, 3)}

        return in_worker_thread(run)


def plain(
    n: Annotated[int, typer.Option(help="Texts per run (each run gets its own).")] = 96,
    rounds: Annotated[int, typer.Option(help="Rounds; each runs the loop and the service once, in ABBA order.")] = 2,
    concurrency: Annotated[int, typer.Option(help="The service's closed-loop clients (one item per request).")] = 16,
    results: ResultsOpt = RESULTS,
) -> None:
    """Texts/s of the service at ``concurrency`` vs a plain transformers loop on the same weights, alternating."""
    pool = texts(n * 2 * rounds, seed=3)
    slices = iter(pool[i:i + n] for i in range(0, len(pool), n))
    loop = PlainLoop()
    runs: dict[str, list[dict[str, Any]]] = {"loop": [], "service": []}
    with saft_server({}) as base:
        drive(base, texts(8, seed=4), 4)  # warm the server's first passes, as the loop's first batch warms it
        loop.rate(texts(8, seed=4))
        for r in range(rounds):
            for name in ("loop", "service") if r % 2 == 0 else ("service", "loop"):
                items = next(slices)
                row = loop.rate(items) if name == "loop" else public(drive(base, items, concurrency))
                runs[name].append(row)
                print(name, row)
    loop_rate = n * rounds / sum(x["seconds"] for x in runs["loop"])
    service_rate = n * rounds / sum(x["seconds"] for x in runs["service"])
    result = {"n_per_run": n, "rounds": rounds, "concurrency": concurrency, "loop": loop.info,
              "loop_texts_per_s": round(loop_rate, 3), "service_texts_per_s": round(service_rate, 3),
              "ratio_service_over_loop": round(service_rate / loop_rate, 3), "runs": runs}
    save("plain-loop", result, results)
    print({k: v for k, v in result.items() if k != "runs"})
