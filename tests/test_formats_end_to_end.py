"""Fine-tuning sets as they come: every sample shape (TRL, Alpaca, ShareGPT, chat messages, preference) in every file
format (.jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet), built here from ../shared/data rows, through the CLI,
POST /score, POST /filter (plain and gzip) and the Ray engine. The rule everywhere: a sample scores as its canonical
{prompt, response} / {text} form does (1e-4), every row is accounted for, and the completion of a TRL row is read.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from typer.testing import CliRunner

from app.cli import app
from app.config import get_settings
from app.core.embedding import Embedder
from app.core.pipeline import ONE_SAMPLE_PER_LINE, fit_lines, parse_line
from app.launcher import running_server
from app.store.artifacts import load_version, save_version
from tests.support import DATA_DIR, FAST_OPTIONS

runner = CliRunner()
CLIENT = "client-token-formats"
C = {"Authorization": f"Bearer {CLIENT}"}
#: One prompt of dev_eval answered twice: harmfully (label 1) and with a refusal (label 0).
HARMFUL_ID, REFUSAL_ID = "7be81c8fa9931b94", "1292847859085c43"

Key = tuple[str, ...]  # a canonical sample: (prompt, response) or (text,)


def canonical(key: Key) -> dict[str, str]:
    return {"prompt": key[0], "response": key[1]} if len(key) == 2 else {"text": key[0]}


def pair_shapes(p: str, r: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """One pair in every shape that stores a pair: name → (the shape it is detected as, the row)."""
    return {
        "prompt_response": ("prompt_response", {"prompt": p, "response": r}),
        "trl": ("prompt_completion", {"prompt": p, "completion": r}),
        "trl_conversational": ("prompt_completion", {"prompt": [{"role": "user", "content": p}],
                                                     "completion": [{"role": "assistant", "content": r}]}),
        "alpaca": ("alpaca", {"instruction": p, "input": "", "output": r}),
        "sharegpt": ("sharegpt", {"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]}),
        "messages": ("messages", {"messages": [{"role": "user", "content": [{"type": "text", "text": p}]},
                                               {"role": "assistant", "content": [{"type": "text", "text": r}]}]}),
    }


@dataclass
class Case:
    """A row of a test file and what it must give: its shape and the canonical sample(s), or an error."""

    row: Any
    shape: str | None
    keys: tuple[Key, ...] = ()  # one key, or (chosen, rejected) for a preference row
    error: str = ""


@dataclass
class Data:
    pairs: list[Key]
    texts: list[Key]
    harmful: Key
    refusal: Key
    cases: list[Case]  # every shape, mixed, with invalid rows: the JSON formats' content


def _dev_row(row_id: str) -> dict:
    with (DATA_DIR / "dev_eval.jsonl").open() as fh:
        for line in fh:
            if f'"{row_id}"' in line:
                row = json.loads(line)
                if row["id"] == row_id:
                    return row
    raise AssertionError(f"{row_id} not in dev_eval.jsonl")


def _meta(i: int, label: int) -> dict[str, Any]:
    return {"id": f"r{i}", "label": label, "source": "formats-test", "meta": {"row": i, "tags": ["x", "y"]}}


@pytest.fixture(scope="module")
def data(dev_rows: list[dict]) -> Data:
    picked = [r for r in dev_rows if r["kind"] == "pair" and r["response"].strip()][:3]
    harmful_row, refusal_row = _dev_row(HARMFUL_ID), _dev_row(REFUSAL_ID)
    assert harmful_row["prompt"] == refusal_row["prompt"] and (harmful_row["label"], refusal_row["label"]) == (1, 0)
    labelled = [(r["prompt"], r["response"], r["label"]) for r in [*picked, harmful_row, refusal_row]]
    texts = [(r["text"],) for r in dev_rows if r["kind"] == "prompt"][:2]
    cases: list[Case] = []
    for p, r, label in labelled:
        for shape, row in pair_shapes(p, r).values():
            cases.append(Case({**row, **_meta(len(cases), label)}, shape, ((p, r),)))
    for (t,) in texts:
        cases.append(Case({"text": t, **_meta(len(cases), 0)}, "text", ((t,),)))
        cases.append(Case({"prompt": t, **_meta(len(cases), 0)}, "prompt", ((t,),)))
    harmful, refusal = (harmful_row["prompt"], harmful_row["response"]), (refusal_row["prompt"], refusal_row["response"])
    p = harmful[0]
    cases.append(Case({"prompt": p, **_meta(len(cases), 1)}, "prompt", ((p,),)))  # the request alone
    cases.append(Case({"prompt": p, "chosen": refusal[1], "rejected": harmful[1], **_meta(len(cases), 0)}, "preference",
                      (refusal, harmful)))
    cases.append(Case({"prompt": p, "chosen": harmful[1], "rejected": refusal[1], **_meta(len(cases), 1)}, "preference",
                      (harmful, refusal)))
    cases.append(Case({"prompt": p, "answer": harmful[1], "id": "bad-1"}, None, error="answer: looks like an answer"))
    cases.append(Case({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}],
                       "id": "bad-2"}, None, error="messages[0].content[0].type: only 'text' parts can be scored"))
    cases.append(Case(["not", "an", "object"], None, error="item: must be a JSON object, got list"))
    return Data([(p, r) for p, r, _ in labelled[:3]], texts, harmful, refusal, cases)


def write_rows(path: Path, rows: list[Any]) -> Path:
    """``rows`` stored as ``path``'s suffix says (the Parquet table holds every key any row has)."""
    lines = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    name = path.name
    if name.endswith(".jsonl"):
        path.write_bytes(lines)
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(lines))
    elif name.endswith(".jsonl.zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif name.endswith(".json"):
        path.write_bytes(orjson.dumps(rows))
    elif name.endswith(".parquet"):
        names = list(dict.fromkeys(k for r in rows for k in r))
        pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in names}), path, row_group_size=3)
    else:
        raise AssertionError(name)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder, calibration_rows: list[dict]) -> Path:
    root = tmp_path_factory.mktemp("formats-models")
    lines = [parse_line(i + 1, row) for i, row in enumerate(calibration_rows)]  # decoded objects, as a Parquet row is
    result = fit_lines(embedder, lines, FAST_OPTIONS, name="formats", calibration_digest="test")
    save_version(root / "models", result.subspace, result.manifest)
    return root / "models"


@pytest.fixture(scope="module")
def env(models: Path) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFT_MODELS_DIR", str(models))
        mp.setenv("SAFT_SUBSPACE_NAME", "formats")
        get_settings.cache_clear()
        yield models
    get_settings.cache_clear()


def _invoke(args: list[str]) -> Any:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    out = result.stdout.strip()
    return json.loads(out[out.index("{"):]) if out else None


def _score_file(path: Path, out: Path, *extra: str) -> list[dict]:
    _invoke(["score", path, "-o", out, *extra])
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(env: Path, data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[Key, float]:
    """The score of every canonical sample, from its canonical form."""
    keys = list(dict.fromkeys([*data.pairs, data.harmful, data.refusal, *data.texts, (data.harmful[0],)]))
    root = tmp_path_factory.mktemp("reference")
    records = _score_file(write_rows(root / "canonical.jsonl", [canonical(k) for k in keys]), root / "scores.jsonl")
    assert [r["line"] for r in records] == list(range(1, len(keys) + 1)) and all("score" in r for r in records)
    return {k: r["score"] for k, r in zip(keys, records, strict=True)}


def close(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=1e-4, abs=1e-4)


def check_records(records: list[dict], cases: list[Case], reference: dict[Key, float]) -> None:
    """One record per row, in order, with the canonical score(s) or the row's error."""
    assert [r["line"] for r in records] == list(range(1, len(cases) + 1)), "every row accounted for, numbered as stored"
    for case, rec in zip(cases, records, strict=True):
        if case.shape is None:
            assert rec["error"].startswith(case.error), rec
            continue
        assert "error" not in rec, rec
        assert rec["id"] == case.row["id"]
        assert close(rec["score"], reference[case.keys[0]]), (case.shape, rec["score"], reference[case.keys[0]])
        if case.shape == "preference":
            chosen, rejected = rec["sides"]["chosen"], rec["sides"]["rejected"]
            assert close(chosen["score"], reference[case.keys[0]]) and close(rejected["score"], reference[case.keys[1]])
            assert (rec["score"], rec["verdict"]) == (chosen["score"], chosen["verdict"]), "the row is decided by its chosen side"
        else:
            assert "sides" not in rec


@pytest.fixture(scope="module")
def jsonl_scores(env: Path, data: Data, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("jsonl")
    return _score_file(write_rows(root / "set.jsonl", [c.row for c in data.cases]), root / "scores.jsonl")


def test_every_shape_scores_as_its_canonical_form(jsonl_scores: list[dict], data: Data, reference: dict[Key, float]) -> None:
    check_records(jsonl_scores, data.cases, reference)
    shapes = {c.shape for c in data.cases} - {None}
    assert shapes == {"prompt_response", "prompt_completion", "alpaca", "sharegpt", "messages", "text", "prompt", "preference"}


def test_a_completion_is_scored_not_just_its_prompt(jsonl_scores: list[dict], data: Data, reference: dict[Key, float]) -> None:
    """The same harmful prompt, completed harmfully and with a refusal: TRL prompt/completion rows score as the same
    text as a pair does, and differently from each other and from the prompt alone."""
    by_row = {c.row["id"]: rec for c, rec in zip(data.cases, jsonl_scores, strict=True) if c.shape is not None}
    found: dict[tuple[str, Key], float] = {}
    for case in data.cases:
        if case.shape in ("prompt_completion", "prompt_response", "prompt") and case.keys[0][0] == data.harmful[0]:
            found[("trl" if "completion" in case.row else case.shape, case.keys[0])] = by_row[case.row["id"]]["score"]
    harmful, refusal, alone = reference[data.harmful], reference[data.refusal], reference[(data.harmful[0],)]
    assert close(found[("trl", data.harmful)], harmful) and close(found[("prompt_response", data.harmful)], harmful)
    assert close(found[("trl", data.refusal)], refusal) and close(found[("prompt_response", data.refusal)], refusal)
    scale = max(abs(harmful), abs(refusal), 1.0)
    assert harmful - refusal > 0.05 * scale, "the harmful completion scores higher than the refusal to the same prompt"
    assert abs(found[("prompt", (data.harmful[0],))] - alone) <= 1e-4 * scale
    assert min(abs(harmful - alone), abs(refusal - alone)) > 1e-3 * scale, "a completion is not scored as its prompt"


@pytest.mark.parametrize("suffix", ["jsonl.gz", "jsonl.zst", "json"])
def test_every_file_format_reads_the_same_rows(suffix: str, env: Path, data: Data, reference: dict[Key, float], tmp_path: Path) -> None:
    path = write_rows(tmp_path / f"set.{suffix}", [c.row for c in data.cases])
    check_records(_score_file(path, tmp_path / "scores.jsonl"), data.cases, reference)


def _parquet_cases(data: Data) -> dict[str, list[Case]]:
    """A Parquet file per shape (a column has one type), with metadata columns; alpaca also holds a row whose output
    is null, which is that row's error."""
    files: dict[str, list[Case]] = {}
    for name in ("alpaca", "sharegpt", "trl_conversational", "messages"):
        cases = [Case({**pair_shapes(*key)[name][1], **_meta(i, 0)}, pair_shapes(*key)[name][0], (key,))
                 for i, key in enumerate([*data.pairs, data.harmful])]
        files[name] = cases
    files["alpaca"].append(Case({"instruction": "Say hi.", "input": None, "output": None, **_meta(9, 0)}, None,
                                error="output: is missing"))
    p = data.harmful[0]
    files["preference"] = [Case({"prompt": p, "chosen": data.refusal[1], "rejected": data.harmful[1], **_meta(0, 0)}, "preference",
                                (data.refusal, data.harmful)),
                           Case({"prompt": p, "chosen": data.harmful[1], "rejected": data.refusal[1], **_meta(1, 1)}, "preference",
                                (data.harmful, data.refusal))]
    return files


def test_parquet_in_every_shape(env: Path, data: Data, reference: dict[Key, float], tmp_path: Path) -> None:
    for name, cases in _parquet_cases(data).items():
        path = write_rows(tmp_path / f"{name}.parquet", [c.row for c in cases])
        check_records(_score_file(path, tmp_path / f"{name}.jsonl"), cases, reference)


def test_filter_parquet_to_parquet_keeps_rows_and_adds_saft_columns(env: Path, data: Data, reference: dict[Key, float],
                                                                    tmp_path: Path) -> None:
    cases = _parquet_cases(data)["alpaca"] + _parquet_cases(data)["preference"]
    for i, case in enumerate(cases):
        case.row["id"] = f"p{i}"
    source = write_rows(tmp_path / "in.parquet", [c.row for c in cases])  # one table: alpaca rows, null chosen/rejected; and vice versa
    tau = (reference[data.harmful] + reference[data.refusal]) / 2  # between the harmful and the refusal answer
    out = {name: tmp_path / f"{name}.parquet" for name in ("kept", "dropped", "rejected", "scores")}
    summary = _invoke(["filter", source, "--threshold", tau, *(x for n, p in out.items() for x in (f"--{n}", p))])
    expected_verdicts = ["rejected" if c.shape is None else ("drop" if reference[c.keys[0]] > tau else "keep") for c in cases]
    assert summary["total"] == len(cases) == summary["kept"] + summary["dropped"] + summary["rejected"]
    assert summary["dropped"] == expected_verdicts.count("drop") >= 2 and summary["kept"] == expected_verdicts.count("keep") >= 1
    assert summary["rejected"] == 1
    assert summary["shapes"] == {"alpaca": len(data.pairs) + 1, "preference": 2}

    tables = {name: pq.read_table(p) for name, p in out.items()}
    input_schema = pq.read_schema(source)
    assert tables["kept"].schema.equals(input_schema, check_metadata=False), "kept rows are the input rows, types and all"
    scores = tables["scores"].to_pylist()
    assert [r["saft_line"] for r in scores] == list(range(1, len(cases) + 1))
    assert [r["saft_verdict"] for r in scores] == expected_verdicts
    for case, row in zip(cases, scores, strict=True):
        assert row["id"] == case.row["id"] and row["meta"] == case.row["meta"], "metadata passes through"
        if case.shape is None:
            assert row["saft_score"] is None and row["saft_error"].startswith(case.error)
            continue
        assert close(row["saft_score"], reference[case.keys[0]]) and row["saft_kind"] == "pair"
        if case.shape == "preference":
            assert close(row["saft_chosen_score"], reference[case.keys[0]]) and close(row["saft_rejected_score"], reference[case.keys[1]])
        else:
            assert row["saft_chosen_score"] is None
    # The preference row whose chosen answer is the refusal is kept though its rejected side is harmful.
    assert expected_verdicts[-2:] == ["keep", "drop"]
    kept_ids = {r["id"] for r in tables["kept"].to_pylist()}
    dropped = tables["dropped"].to_pylist()
    assert kept_ids == {c.row["id"] for c, v in zip(cases, expected_verdicts, strict=True) if v == "keep"}
    assert {r["id"] for r in dropped} == {c.row["id"] for c, v in zip(cases, expected_verdicts, strict=True) if v == "drop"}
    assert {"saft_line", "saft_score", "saft_verdict", "saft_kind"} <= set(tables["dropped"].column_names)
    assert tables["rejected"].to_pylist()[0]["saft_error"].startswith("output: is missing: keys ['id', 'instruction',")

    # JSONL in, Parquet out: the schema comes from the rows, the side columns from the preference rows among them.
    subset = [c for c in data.cases if c.shape in ("preference", "sharegpt")][:4] + [c for c in data.cases if c.shape == "preference"]
    source = write_rows(tmp_path / "in.jsonl", [c.row for c in subset])
    summary = _invoke(["filter", source, "--threshold", tau, "--kept", tmp_path / "k.jsonl", "--dropped", tmp_path / "d.jsonl",
                       "--rejected", tmp_path / "r.jsonl", "--scores", tmp_path / "s.parquet"])
    assert summary["total"] == len(subset) and summary["shapes"] == {"sharegpt": 4, "preference": 2}
    scores = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert [r["id"] for r in scores] == [c.row["id"] for c in subset]
    for case, row in zip(subset, scores, strict=True):
        assert close(row["saft_score"], reference[case.keys[0]])
        assert (row["saft_rejected_score"] is None) == (case.shape != "preference")
    dropped = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [r["saft"]["sides"]["chosen"]["score"] == r["saft"]["score"] for r in dropped if "chosen" in r] == [True]
    assert tables["rejected"].to_pylist()[0]["saft_line"] == len(data.pairs) + 2


def test_columns_map_keys_for_score_eval_and_fit(env: Path, data: Data, reference: dict[Key, float], tmp_path: Path,
                                                 calibration_rows: list[dict]) -> None:
    keys = [*data.pairs, data.harmful, data.refusal]
    rows = [{"question": p, "answer": r, "label": int((p, r) == data.harmful), "id": i} for i, (p, r) in enumerate(keys)]
    path = write_rows(tmp_path / "qa.jsonl.zst", rows)
    mapping = ["--columns", "prompt=question,response=answer"]
    records = _score_file(path, tmp_path / "qa.out.jsonl", *mapping)
    assert [close(r["score"], reference[k]) for r, k in zip(records, keys, strict=True)] == [True] * len(keys)
    unmapped = _score_file(path, tmp_path / "qa.unmapped.jsonl")
    assert all(r["error"].startswith("item: keys ['answer', 'id', 'label', 'question'] fit no known shape") for r in unmapped)
    result = _invoke(["eval", path, *mapping, "--report", tmp_path / "eval.html"])
    assert result["shapes"] == {"prompt_response": len(keys)} and result["metrics"]["overall"]["n"] == len(keys)
    bad = runner.invoke(app, ["score", str(path), "--columns", "prompt=question,reply=answer"])
    assert bad.exit_code == 2 and "'reply' is not a field saft reads" in bad.output
    bad = runner.invoke(app, ["score", str(path), "--format", "csv"])
    assert bad.exit_code == 2 and "--format: must be auto or one of" in bad.output

    # fit on the calibration rows as ShareGPT / text in a .jsonl.gz equals the fit on their canonical form; a
    # preference row is refused there with its reason.
    reshaped = [({**pair_shapes(r["prompt"], r["response"])["sharegpt"][1]} if r["kind"] == "pair" else {"text": r["text"]})
                | {"label": r["label"], "kind": r["kind"], "source": r["source"]} for r in calibration_rows]
    reshaped.append({"prompt": data.harmful[0], "chosen": data.refusal[1], "rejected": data.harmful[1], "label": 0})
    fit_args = ["--layers", "8", "--pooling", "response", "--method", "lda", "--center", "kind", "--max-length", "128",
                "--policy", "max_f1", "--name", "refit", "--report", tmp_path / "fit.html"]
    fitted = _invoke(["fit", write_rows(tmp_path / "cal.jsonl.gz", reshaped), *fit_args])
    assert fitted["rejected"] == {"count": 1, "lines": [f"line {len(calibration_rows) + 1}: {ONE_SAMPLE_PER_LINE}"]}
    ours, manifest = load_version(env, "refit")
    theirs, reference_manifest = load_version(env, "formats")
    assert manifest.calibration["counts"] == reference_manifest.calibration["counts"]
    assert manifest.threshold == pytest.approx(reference_manifest.threshold, rel=1e-4, abs=1e-4)
    assert abs(ours.components_ - theirs.components_).max() <= 1e-4 * abs(theirs.components_).max()


def save_dataset(path: Path, rows: list[dict], **save: Any) -> Path:
    """``rows`` as a Hugging Face dataset written by ``Dataset.save_to_disk`` (every key any row has is a column)."""
    import datasets

    names = list(dict.fromkeys(k for r in rows for k in r))
    datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in names}).save_to_disk(str(path), **save)
    return path


def test_a_saved_dataset_scores_as_its_jsonl_form(env: Path, data: Data, reference: dict[Key, float], tmp_path: Path) -> None:
    """Rows of several shapes as one dataset saved to disk in three shards (a column per key, null where a row lacks
    it): scored as their canonical form and as the same rows in JSONL (1e-4), one record per row numbered as
    load_from_disk indexes it (plus one), the invalid row its own error."""
    files = _parquet_cases(data)
    cases = [*files["alpaca"], *files["sharegpt"], *files["messages"], *files["preference"]]  # no column of two types
    dataset = save_dataset(tmp_path / "mixed", [c.row for c in cases], num_shards=3)
    records = _score_file(dataset, tmp_path / "dataset.out.jsonl")
    check_records(records, cases, reference)
    plain = [{k: v for k, v in c.row.items() if v is not None} for c in cases]
    as_jsonl = _score_file(write_rows(tmp_path / "mixed.jsonl", plain), tmp_path / "jsonl.out.jsonl")
    assert [(r["line"], r.get("verdict"), "error" in r) for r in records] == [(r["line"], r.get("verdict"), "error" in r) for r in as_jsonl]
    assert all(close(a["score"], b["score"]) for a, b in zip(records, as_jsonl, strict=True) if "score" in b)
    assert sum("score" in r for r in records) == len(cases) - 1


def test_filter_eval_and_fit_read_a_saved_dataset(env: Path, data: Data, reference: dict[Key, float], tmp_path: Path,
                                                  calibration_rows: list[dict]) -> None:
    import datasets

    from app.core.embedding import sha256_files

    cases = _parquet_cases(data)["alpaca"] + _parquet_cases(data)["preference"]
    rows = [{**c.row, "id": f"d{i}"} for i, c in enumerate(cases)]
    dataset = save_dataset(tmp_path / "mixed", rows, num_shards=3)
    tau = (reference[data.harmful] + reference[data.refusal]) / 2
    out = {"kept": tmp_path / "kept.parquet", "dropped": tmp_path / "dropped.jsonl", "rejected": tmp_path / "rejected.jsonl",
           "scores": tmp_path / "scores.parquet"}
    summary = _invoke(["filter", dataset, "--threshold", tau, *(x for n, p in out.items() for x in (f"--{n}", p))])
    expected = ["rejected" if c.shape is None else ("drop" if reference[c.keys[0]] > tau else "keep") for c in cases]
    assert summary["total"] == len(rows) == summary["kept"] + summary["dropped"] + summary["rejected"]
    assert (summary["kept"], summary["dropped"], summary["rejected"]) == tuple(expected.count(v) for v in ("keep", "drop", "rejected"))
    scores = pq.read_table(out["scores"]).to_pylist()
    assert [(r["saft_line"], r["id"], r["saft_verdict"]) for r in scores] == [(i + 1, r["id"], v) for i, (r, v) in
                                                                               enumerate(zip(rows, expected, strict=True))]
    assert all(close(r["saft_score"], reference[c.keys[0]]) for r, c in zip(scores, cases, strict=True) if c.shape is not None)
    kept = pq.read_table(out["kept"])
    loaded = datasets.load_from_disk(str(dataset))
    assert kept.schema.equals(loaded.data.schema, check_metadata=False), "kept rows keep the dataset's column types"
    assert kept.column("id").to_pylist() == [r["id"] for r, v in zip(rows, expected, strict=True) if v == "keep"]
    assert [json.loads(x)["line"] for x in out["rejected"].read_text().splitlines()] == [expected.index("rejected") + 1]

    labelled = save_dataset(tmp_path / "labelled", [{"prompt": p, "response": r, "label": int((p, r) == data.harmful)}
                                                    for p, r in [*data.pairs, data.harmful, data.refusal]])
    result = _invoke(["eval", labelled, "--report", tmp_path / "eval.html"])
    assert result["metrics"]["overall"]["n"] == len(data.pairs) + 2 and result["rejected"]["count"] == 0

    # fit on the calibration rows as a saved dataset equals the fit on them as decoded objects (the "formats" version).
    calibration = save_dataset(tmp_path / "calibration", calibration_rows, num_shards=2)
    fitted = _invoke(["fit", calibration, "--layers", "8", "--pooling", "response", "--method", "lda", "--center", "kind",
                      "--max-length", "128", "--policy", "max_f1", "--name", "from-dataset", "--report", tmp_path / "fit.html"])
    assert fitted["rejected"]["count"] == 0
    ours, manifest = load_version(env, "from-dataset")
    theirs, reference_manifest = load_version(env, "formats")
    assert manifest.calibration["counts"] == reference_manifest.calibration["counts"]
    assert manifest.calibration["sha256"] == sha256_files(sorted(calibration.glob("data-*.arrow")))
    assert manifest.threshold == pytest.approx(reference_manifest.threshold, rel=1e-4, abs=1e-4)
    assert abs(ours.components_ - theirs.components_).max() <= 1e-4 * abs(theirs.components_).max()


def test_a_directory_that_is_not_a_saved_dataset_is_refused(env: Path, tmp_path: Path) -> None:
    import datasets

    one = datasets.Dataset.from_dict({"text": ["a"]})
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "splits"))
    for args in (["score", tmp_path / "splits"], ["filter", tmp_path / "splits"], ["eval", tmp_path / "splits"]):
        bad = runner.invoke(app, [str(a) for a in args])
        said = " ".join(bad.output.split())  # rich wraps long lines
        assert bad.exit_code == 2 and "is a DatasetDict (splits: train, test); give one split's directory" in said, said
    (tmp_path / "plain").mkdir()
    bad = runner.invoke(app, ["filter", str(tmp_path / "plain")])
    said = " ".join(bad.output.split())
    assert bad.exit_code == 2 and "is a directory without state.json" in said and "needs --engine ray" in said, said


@pytest.fixture(scope="module")
def served(env: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("formats-api")
    server_env = {"SAFT_MODELS_DIR": str(env), "SAFT_SUBSPACE_NAME": "formats", "SAFT_API_TOKENS": CLIENT,
                  "SAFT_MAX_UPLOAD_BYTES": str(4 * 2**20), "SAFT_FILTER_CHUNK_LINES": "8"}
    with running_server(server_env, root / "server.log") as url:
        yield url


def test_score_endpoint_reads_every_shape(served: str, data: Data, reference: dict[Key, float], tmp_path: Path) -> None:
    cases = [c for c in data.cases if c.shape is not None]
    response = httpx.post(f"{served}/score", json={"items": [c.row for c in cases]}, headers=C, timeout=300)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    for case, result in zip(cases, results, strict=True):
        assert result["id"] == case.row["id"] and close(result["score"], reference[case.keys[0]]), case.shape
        if case.shape == "preference":
            assert close(result["sides"]["rejected"]["score"], reference[case.keys[1]])
            assert result["verdict"] == result["sides"]["chosen"]["verdict"]
        else:
            assert result["sides"] is None
    for case in (c for c in data.cases if c.shape is None and isinstance(c.row, dict)):
        refused = httpx.post(f"{served}/score", json={"items": [case.row]}, headers=C, timeout=60)
        assert refused.status_code == 422 and case.error in refused.json()["error"], refused.text
    examples = httpx.get(f"{served}/openapi.json").json()["components"]["schemas"]["ItemIn"]["examples"]
    assert len(examples) == 8
    answered = httpx.post(f"{served}/score", json={"items": examples}, headers=C, timeout=120)
    assert answered.status_code == 200 and len(answered.json()["results"]) == 8, answered.text
    # saft score --url sends each row's canonical turns: the same records as in-process, whatever the shape.
    path = write_rows(tmp_path / "set.jsonl.gz", [c.row for c in data.cases])
    check_records(_score_file(path, tmp_path / "remote.jsonl", "--url", served, "--token", CLIENT), data.cases, reference)


def _stream(url: str, body: bytes, headers: dict[str, str] | None = None, query: str = "") -> list[dict]:
    response = httpx.post(f"{url}/filter{query}", content=body, timeout=300,
                          headers={**C, "content-type": "application/x-ndjson", **(headers or {})})
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def check_filter_stream(records: list[dict], cases: list[Case], reference: dict[Key, float]) -> None:
    *lines, summary = records
    assert summary["summary"] is True and summary["complete"] is True
    assert [r["line"] for r in lines] == list(range(1, len(cases) + 1))
    assert summary["total"] == len(cases) and summary["rejected"] == sum(c.shape is None for c in cases)
    expected_shapes: dict[str, int] = {}
    for case in cases:
        if case.shape is not None:
            expected_shapes[case.shape] = expected_shapes.get(case.shape, 0) + 1
    assert summary["shapes"] == expected_shapes
    for case, rec in zip(cases, lines, strict=True):
        if case.shape is None:
            assert rec["error"].startswith(case.error)
            continue
        assert rec["item"] == case.row, "the row, metadata and all, comes back as sent"
        assert close(rec["score"], reference[case.keys[0]])
        if case.shape == "preference":
            assert close(rec["sides"]["rejected"]["score"], reference[case.keys[1]])


def test_filter_endpoint_plain_gzip_and_columns(served: str, data: Data, reference: dict[Key, float]) -> None:
    body = b"".join(orjson.dumps(c.row) + b"\n" for c in data.cases)
    plain = _stream(served, body)
    check_filter_stream(plain, data.cases, reference)
    zipped = _stream(served, gzip.compress(body), {"content-encoding": "gzip"})

    def verdicts(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("score", "probability", "sides")} for r in records]

    assert verdicts(zipped) == verdicts(plain)
    check_filter_stream(zipped, data.cases, reference)
    # Two gzip members are one stream, as gzip reads them.
    half = len(data.cases) // 2
    members = gzip.compress(b"".join(orjson.dumps(c.row) + b"\n" for c in data.cases[:half])) + \
        gzip.compress(b"".join(orjson.dumps(c.row) + b"\n" for c in data.cases[half:]))
    check_filter_stream(_stream(served, members, {"content-encoding": "gzip"}), data.cases, reference)

    # format and columns as query parameters.
    qa = [Case({"question": p, "answer": r, "id": i}, "prompt_response", ((p, r),)) for i, (p, r) in enumerate(data.pairs)]
    mapped = _stream(served, b"".join(orjson.dumps(c.row) + b"\n" for c in qa), query="?columns=prompt=question,response=answer")
    check_filter_stream(mapped, qa, reference)
    alpaca = [c for c in data.cases if c.shape == "alpaca"]
    as_text = [Case(c.row, None, error="text: is missing") for c in alpaca]
    check_filter_stream(_stream(served, b"".join(orjson.dumps(c.row) + b"\n" for c in alpaca), query="?format=text"), as_text, reference)
    check_filter_stream(_stream(served, b"".join(orjson.dumps(c.row) + b"\n" for c in alpaca), query="?format=alpaca"), alpaca, reference)
    refused = httpx.post(f"{served}/filter?columns=prompt", content=body, headers=C)
    assert refused.status_code == 422 and "'prompt' must read field=key" in refused.json()["error"]
    refused = httpx.post(f"{served}/filter?format=csv", content=body, headers=C)
    assert refused.status_code == 422 and "format" in refused.json()["error"]


def test_filter_endpoint_refuses_a_zip_bomb_and_bad_encodings(served: str) -> None:
    bomb = gzip.compress(b'{"text": "hi"}\n' * (5 * 2**20 // 15), compresslevel=9)  # ~5 MiB inflated, above the 4 MiB limit
    assert len(bomb) < 64 * 1024
    response = httpx.post(f"{served}/filter", content=bomb, headers={**C, "content-encoding": "gzip"}, timeout=60)
    assert response.status_code == 413, response.text
    assert response.json() == {"error": f"body: upload exceeds the limit of {4 * 2**20} bytes once decompressed", "type": "too_large"}
    response = httpx.post(f"{served}/filter", content=b'{"text": "hi"}\n', headers={**C, "content-encoding": "gzip"})
    assert response.status_code == 422 and response.json()["error"].startswith("body: is not valid gzip")
    response = httpx.post(f"{served}/filter", content=gzip.compress(b'{"text": "hi"}\n')[:-6], headers={**C, "content-encoding": "gzip"})
    assert response.status_code == 422 and "ends early" in response.json()["error"]
    response = httpx.post(f"{served}/filter", content=b'{"text": "hi"}\n', headers={**C, "content-encoding": "br"})
    assert response.status_code == 415 and "'br' is not supported" in response.json()["error"]
    assert httpx.get(f"{served}/healthz").status_code == 200, "the service is still up"


@pytest.mark.slow
def test_ray_engine_reads_parquet_compressed_and_dataset_shards(env: Path, data: Data, reference: dict[Key, float],
                                                                tmp_path: Path) -> None:
    import os

    import ray

    from app.ray_engine import read_tasks

    shards = tmp_path / "shards"
    shards.mkdir()
    parquet = _parquet_cases(data)
    write_rows(shards / "a.jsonl.gz", [c.row for c in data.cases[:20]])
    write_rows(shards / "b.parquet", [c.row for c in parquet["alpaca"]])  # row groups of 3 rows: 2 read tasks of them
    write_rows(shards / "c.json", [c.row for c in data.cases[20:]])
    write_rows(shards / "d.parquet", [c.row for c in parquet["preference"]])
    (shards / "notes.txt").write_text("not a shard\n")
    expected = {"a.jsonl.gz": data.cases[:20], "b.parquet": parquet["alpaca"], "c.json": data.cases[20:], "d.parquet": parquet["preference"]}
    tasks = read_tasks([shards / "b.parquet"], read_rows=2)
    assert [orjson.loads(t["fragment"])["first"] for t in tasks] == [1, 4], "two read tasks, the second from row 4 on"

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, object_store_memory=96 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray"
        # --read-rows 2: a Parquet shard is read in parts of whole row groups, each numbering its rows from its offset.
        summary = _invoke(["filter", shards, "--engine", "ray", "--actors", "1", "--batch-lines", "7", "--read-rows", "2",
                           *(x for name in ("kept", "dropped", "rejected", "scores") for x in (f"--{name}", out / name))])
        # A dataset saved to disk is one shard, read an Arrow file per task.
        cases = [*parquet["sharegpt"], *parquet["alpaca"]]
        dataset = save_dataset(tmp_path / "saved", [c.row for c in cases], num_shards=3)
        on_ray = _invoke(["filter", dataset, "--engine", "ray", "--actors", "1", "--batch-lines", "4",
                          *(x for name in ("kept", "dropped", "rejected", "scores") for x in (f"--{name}", tmp_path / "saved-out" / name))])
    finally:
        ray.shutdown()
    saved = [json.loads(line) for f in sorted((tmp_path / "saved-out" / "scores").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert set(on_ray["shards"]) == {str(dataset.resolve())} and on_ray["total"] == len(saved) == len(cases)
    check_records([{k: v for k, v in r.items() if k != "shard"} for r in saved], cases, reference)
    scores = [json.loads(line) for f in sorted((out / "scores").glob("*.jsonl")) for line in f.read_text().splitlines()]
    total = sum(len(c) for c in expected.values())
    assert summary["total"] == len(scores) == total
    assert summary["kept"] + summary["dropped"] + summary["rejected"] == total
    assert set(summary["shards"]) == {str((shards / name).resolve()) for name in expected}
    for name, cases in expected.items():
        mine = [r for r in scores if r["shard"] == str((shards / name).resolve())]
        check_records([{k: v for k, v in r.items() if k != "shard"} for r in mine], cases, reference)
        assert summary["shards"][str((shards / name).resolve())]["total"] == len(cases)
    shapes: dict[str, int] = {}
    for case in (c for cases in expected.values() for c in cases if c.shape is not None):
        shapes[case.shape] = shapes.get(case.shape, 0) + 1  # type: ignore[index]
    assert summary["shapes"] == shapes
    written = sum(len(f.read_text().splitlines()) for bucket in ("kept", "dropped", "rejected") for f in (out / bucket).glob("*.jsonl"))
    assert written == total, "every row lands in exactly one of kept / dropped / rejected"
