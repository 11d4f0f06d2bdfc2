"""benchmark/published.yaml: the schema check, rejection of bad files, and which row a run is compared with."""
from __future__ import annotations

import copy

import pytest
import yaml

from benchmark.errors import BitbenchError
from benchmark.report.published import MARKS, NO_NUMBER, load_published, match_published, validate_published

GOOD = {"key": "imagenet-resnet18-bireal", "dataset": "imagenet", "arch": "resnet18", "method": "bireal",
        "top1": 56.4, "top5": 79.5, "source": "Bi-Real ECCV 2018 result table", "mark": "code"}


def test_shipped_file_validates_and_cites_every_row():
    rows = load_published()
    assert len(rows) > 50
    assert len({r["key"] for r in rows}) == len(rows)
    for r in rows:
        assert r["source"].strip() and r["mark"] in MARKS, r["key"]
        assert r["top1"] is None or 0 < r["top1"] <= 100
    # BiTAT: no number is on file, so none is invented
    bitat = [r for r in rows if r["method"] == "bitat"]
    assert bitat and all(r["top1"] is None for r in bitat)
    # the Fashion-MNIST full-precision ceilings are kept, as context only
    ceilings = [r for r in rows if r["dataset"] == "fashion-mnist"]
    assert {r["top1"] for r in ceilings} == {94.9, 96.7, 95.7, 92.1, 92.2}
    assert all(r["context"] and r["mark"] == "quoted" for r in ceilings)
    # no row claims to come from a paper table: none has been read from a PDF yet (published.md)
    assert not [r for r in rows if r["mark"] == "paper"]


@pytest.mark.parametrize("change, message", [
    ({"source": None}, "missing 'source'"),
    ({"source": "  "}, "missing 'source'"),
    ({"mark": "checked"}, "not in the legend"),
    ({"mark": None}, "missing 'mark'"),
    ({"top1": 156.4}, "not an accuracy"),
    ({"top1": "56.4"}, "not an accuracy"),
    ({"top5": 50.0}, "below top1"),
    ({"ops": 163000000}, "ops_source and ops_mark"),
    ({"dataset": "imagenet-1k"}, "unknown dataset"),
    ({"arch": "any"}, "not 'any'"),
    ({"mark": "paper"}, "table number"),
    ({"context": "yes"}, "context must be"),
    ({"verified": True}, "unknown field"),
])
def test_bad_rows_are_rejected_with_a_clear_message(change, message):
    row = {**copy.deepcopy(GOOD), **change}
    row = {k: v for k, v in row.items() if v is not None}
    with pytest.raises(BitbenchError, match=message) as err:
        validate_published([row])
    assert "\n" not in str(err.value) and "imagenet-resnet18-bireal" in str(err.value)


def test_duplicate_keys_and_missing_source_in_a_file(tmp_path):
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump({"rows": [GOOD, {**GOOD, "top1": 57.0}]}))
    with pytest.raises(BitbenchError, match="duplicate key 'imagenet-resnet18-bireal'") as err:
        load_published(path)
    assert str(path) in str(err.value)
    path.write_text(yaml.safe_dump({"rows": [{k: v for k, v in GOOD.items() if k != "source"}]}))
    with pytest.raises(BitbenchError, match="missing 'source'"):
        load_published(path)
    path.write_text("rows: [oops")
    with pytest.raises(BitbenchError, match="not valid YAML"):
        load_published(path)
    with pytest.raises(BitbenchError, match="does not exist"):
        load_published(tmp_path / "nothing.yaml")


def test_matching_stays_within_one_setting():
    rows = load_published()
    row, _ = match_published(rows, "imagenet", "resnet18", "bireal", "paper")
    assert (row["key"], row["top1"], row["mark"]) == ("imagenet-resnet18-bireal", 56.4, "code")
    # a published ImageNet number never matches a Fashion-MNIST run, and ceilings are context only
    assert match_published(rows, "fashion-mnist", "resnet18", "bireal", None) == (None, [])
    assert match_published(rows, "fashion-mnist", "resnet18", "fp", None) == (None, [])
    # the ReActNet-A step-1 number (context) is never the target; the [code] row wins over the [quoted] one
    row, others = match_published(rows, "imagenet", "mobilenetv1", "reactnet", None)
    assert row["key"] == "imagenet-mobilenetv1-reactnet-a" and row["top1"] == 69.4
    assert "imagenet-mobilenetv1-reactnet-a-step1" not in [r["key"] for r in others]
    row, others = match_published(rows, "imagenet", "resnet18", "reactnet", None)
    assert row["key"] == "imagenet-resnet18-reactnet-code" and [r["key"] for r in others] == [
        "imagenet-resnet18-reactnet-paper"]
    # BiTAT: the numberless row of 'any' backbone is what the leaderboard cites
    row, _ = match_published(rows, "imagenet", "mobilenetv1", "bitat", None)
    assert row["top1"] is None and "BiTAT paper" in row["source"]
    # a row naming a variant matches only that variant and is preferred for it
    extra = validate_published([GOOD, {**GOOD, "key": "v", "variant": "pytorch", "top1": 60.0}])
    assert match_published(extra, "imagenet", "resnet18", "bireal", "pytorch")[0]["key"] == "v"
    assert match_published(extra, "imagenet", "resnet18", "bireal", "paper")[0]["key"] == GOOD["key"]
    assert NO_NUMBER == "no published number on file"
