"""One fit-parameter model (FitParams): the CLI and the refit API check the same names, types and bounds, and their
defaults are FitOptions' (the committed default's settings)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from app.cli import app
from app.core.pipeline import DEFAULT_FIT_EMBEDDING, FitOptions, FitParams
from app.core.quality import ThresholdPolicy
from app.core.subspace import FitError


def test_the_defaults_are_the_fit_options_defaults() -> None:
    assert FitParams().options() == FitOptions()
    assert FitParams().options().embedding == DEFAULT_FIT_EMBEDDING


def test_every_parameter_reaches_the_options() -> None:
    params = FitParams.of(layers="-1,8", pooling="mean", template="judge", max_length=64, truncation_side="right",
                          method="lda", k=2, center="global", standardize=False, shrinkage=0.25, balance="item", nuisance=3,
                          cross_fit="none", policy="drop_rate:0.2", mode="replace", labelled_weight=4, pseudo_weight=0.5)
    o = params.options()
    assert (o.embedding.layers, o.embedding.pooling, o.embedding.template, o.embedding.max_length, o.embedding.truncation_side) \
        == ((-1, 8), "mean", "judge", 64, "right")
    assert (o.method, o.k, o.center, o.standardize, o.shrinkage, o.balance, o.nuisance, o.cross_fit, o.mode) \
        == ("lda", 2, "global", False, 0.25, "item", 3, "none", "replace")
    assert o.policy == ThresholdPolicy("drop_rate", 0.2) and (o.labelled_weight, o.pseudo_weight) == (4, 0.5)


def test_each_bad_parameter_is_named() -> None:
    with pytest.raises(FitError) as err:
        FitParams.of(pooling="max", shrinkage=2, policy="fpr:x", layers="1;2", shrinkge=0.1)
    message = str(err.value)
    for name in ("pooling:", "shrinkage:", "policy:", "layers:", "shrinkge: Extra inputs are not permitted"):
        assert name in message, message


def test_the_cli_refuses_a_bad_value_before_loading_anything(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "x", "label": 0}\n')
    result = CliRunner().invoke(app, ["fit", str(data), "--pooling", "max"])
    assert result.exit_code != 0 and "pooling: Input should be 'last', 'mean' or 'response'" in result.output, result.output
