"""Data config: defaults, validation errors that name the field, bad sources at build time."""

import re

import ml_collections
import pytest

from phi3_jax.data import DataError, default_data_config, make_pipeline, make_tokenizer, validate_data_config

TOK = make_tokenizer("byte")


def test_default_config_is_complete_and_valid():
    cfg = default_data_config()
    assert isinstance(cfg, ml_collections.ConfigDict)
    spec = validate_data_config(cfg)
    assert [s.name for s in spec.sources] == ["textbook", "stdlib", "textbook_hq"]
    assert spec.source("textbook_hq").kind == "filtered" and spec.source("textbook_hq").base == "textbook"
    assert [p.name for p in spec.phases] == ["pretrain", "anneal"] and spec.phases[-1].tokens == 0
    assert spec.tokenizer["kind"] == "byte" and spec.quality["scorer"] == "heuristic"
    assert spec.packing == "concat" and 0 < spec.eval_fraction < 1
    # Plain dicts work too, with defaults filled in.
    spec = validate_data_config({"sources": [{"name": "t"}], "phases": [{"tokens": 0}]})
    assert spec.sources[0].kind == "textbook" and spec.phases[0].weights == (("t", 1.0),)


def _bad(mutate):
    cfg = default_data_config().to_dict()
    mutate(cfg)
    return cfg


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(shuffel=True), "data.shuffel: unknown field"),
    (lambda c: c["sources"][1].update(wieght=1.0), "data.sources[1].wieght: unknown field"),
    (lambda c: c["phases"][0].update(budget=5), "data.phases[0].budget: unknown field"),
    (lambda c: c["quality"].update(cutoff=0.3), "data.quality.cutoff: unknown field"),
    (lambda c: c["sources"][0].update(weight="high"), "data.sources[0].weight: expected float, got str"),
    (lambda c: c["sources"][0].update(num_docs=2.5), "data.sources[0].num_docs: expected int, got float"),
    (lambda c: c["phases"][0].update(tokens="1M"), "data.phases[0].tokens: expected int, got str"),
    (lambda c: c["phases"][0]["weights"].update(stdlib="x"), "data.phases[0].weights.stdlib: expected float"),
    (lambda c: c.update(shuffle="yes"), "data.shuffle: expected bool, got str"),
    (lambda c: c.update(eval_max_docs=True), "data.eval_max_docs: expected int, got bool"),
    (lambda c: c["tokenizer"].update(path=None), "data.tokenizer.path: expected str, got NoneType"),
    (lambda c: c["sources"][0].update(kind="parquet"), "data.sources[0].kind: unknown source kind 'parquet'"),
    (lambda c: c["sources"][2].update(base="nope"), "data.sources[2].base: 'nope' is not a source name"),
    (lambda c: c["phases"][0]["weights"].update(wiki=0.5), "data.phases[0].weights.wiki: not a source name"),
    (lambda c: c["phases"][0].update(tokens=0), "data.phases[0].tokens: must be > 0"),
    (lambda c: c["phases"][1].update(weights={"stdlib": 0.0}), "data.phases[1].weights: no source has a positive"),
    (lambda c: c["sources"].append(dict(c["sources"][0])), "duplicate source name 'textbook'"),
    (lambda c: c["sources"][0].update(kind="jsonl"), "data.sources[0].path: a jsonl source needs a path"),
    (lambda c: c.update(packing="best_fit"), "data.packing: unknown method 'best_fit'"),
    (lambda c: c.update(sources=[]), "data.sources: expected a non-empty list"),
])
def test_validation_names_the_field(mutate, message):
    with pytest.raises(DataError, match=re.escape(message)):
        validate_data_config(_bad(mutate))


def test_missing_path_fails_at_build_naming_the_path(tmp_path):
    missing = str(tmp_path / "corpus.jsonl")
    cfg = default_data_config()
    cfg.sources = [{"name": "web", "kind": "jsonl", "path": missing}]
    cfg.phases = [{"name": "p", "tokens": 0}]
    with pytest.raises(DataError, match=f"path not found: {re.escape(missing)}"):
        make_pipeline(cfg, TOK, 32, 4, seed=0)


def test_bad_pipeline_arguments():
    cfg = default_data_config()
    with pytest.raises(DataError, match="split"):
        make_pipeline(cfg, TOK, 32, 4, seed=0, split="test")
    with pytest.raises(DataError, match="seed"):
        make_pipeline(cfg, TOK, 32, 4, seed=-1)
    with pytest.raises(DataError, match="process_index"):
        make_pipeline(cfg, TOK, 32, 4, seed=0, process_index=2, process_count=2)
    with pytest.raises(DataError, match="eval_sources: 'wiki'"):
        make_pipeline(cfg, TOK, 32, 4, seed=0, split="eval", eval_sources=["wiki"])


def test_threshold_that_removes_everything_is_reported():
    cfg = default_data_config()
    cfg.sources[2]["threshold"] = 1.5
    with pytest.raises(DataError, match="threshold 1.5 keeps none"):
        make_pipeline(cfg, TOK, 32, 4, seed=0)
