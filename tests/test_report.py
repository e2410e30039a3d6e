"""prefcache.analysis.report and `prefcache report`: the HTML is checked structurally (no browser needed)."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_analysis import examples_table, write_run  # the hand-worked fixture of the analysis tests

from prefcache.analysis.charts import _nice_ticks, bar_chart, histogram_chart, line_chart
from prefcache.analysis.report import build_report, write_report
from prefcache.cli.sql import report_cmd

SVG_NS = "{http://www.w3.org/2000/svg}"


class _Outline(HTMLParser):
    """Headings, tags, and anything that would reach outside the page."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.headings: list[str] = []
        self.external: list[str] = []
        self._in_heading = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_heading = tag in ("h1", "h2")
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.external.append(value)
        if tag in ("script", "link", "img", "iframe"):
            self.external.append(tag)

    def handle_endtag(self, tag):
        if tag in ("h1", "h2"):
            self._in_heading = False

    def handle_data(self, data):
        if self._in_heading:
            self.headings.append(data.strip())


def _svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(s) for s in re.findall(r"<svg.*?</svg>", page, re.S)]  # each must be well-formed XML


def _titles(svgs) -> list[str]:
    return [svg.find(f"{SVG_NS}title").text for svg in svgs]


@pytest.fixture
def run1(tmp_path):
    return write_run(tmp_path / "run1")


def test_report_has_every_section_and_chart(run1):
    page = build_report(run1)
    outline = _Outline()
    outline.feed(page)
    assert page.startswith("<!DOCTYPE html>") and outline.external == []
    assert outline.headings[0] == "prefcache report: run1"
    assert {"Training curves", "Margins and length bias", "Evaluations"} <= set(outline.headings)
    assert any(h.startswith("Hardest pairs") for h in outline.headings)
    titles = _titles(_svgs(page))
    assert titles[:4] == ["Loss", "Reward accuracy", "Reward margin (chosen − rejected)", "Mean implicit rewards"]
    assert "Reward margins (train), first and last logged step" in titles
    assert any(t.startswith("Accuracy by length difference (train, step 2)") for t in titles)
    assert any(t.startswith("Mean reward by length difference") for t in titles)
    # the run.json facts, the last logged step, the evals table and the hardest pair's text are on the page
    assert "sigmoid" in page and "last train step 2" in page and "arc_easy" in page and "good answer p2" in page


def test_curves_draw_train_and_eval(run1):
    svgs = _svgs(build_report(run1))
    loss = svgs[0]
    assert len(loss.findall(f"{SVG_NS}polyline")) == 1  # train has two points, eval one (a marker only)
    markers = [c for c in loss.findall(f"{SVG_NS}circle") if c.find(f"{SVG_NS}title") is not None]
    assert len(markers) == 3
    # eval is told apart from train by more than colour: hollow markers (and a dashed line)
    fills = {c.find(f"{SVG_NS}title").text.split()[0]: c.get("fill") for c in markers}
    assert fills["train"] != "#fff" and fills["eval"] == "#fff"
    legend = [t.text for t in loss.iter(f"{SVG_NS}text")]
    assert "train" in legend and "eval" in legend
    accuracy = svgs[1]  # with a chance line at 0.5
    assert "chance (0.5)" in [t.text for t in accuracy.iter(f"{SVG_NS}text")]


def test_histogram_compares_first_and_last_step_on_shared_buckets(run1):
    svgs = _svgs(build_report(run1))
    hist = next(s for s in svgs if s.find(f"{SVG_NS}title").text.startswith("Reward margins"))
    tips = [r.find(f"{SVG_NS}title").text for r in hist.iter(f"{SVG_NS}rect") if r.find(f"{SVG_NS}title") is not None]
    first = [t for t in tips if t.startswith("step 1 ")]
    last = [t for t in tips if t.startswith("step 2 ")]
    assert len(first) == len(last) == 30

    def buckets(ts):
        return [re.search(r"\[[^)]*\)", t).group(0) for t in ts]
    assert buckets(first) == buckets(last)  # same bucket edges
    legend = [t.text for t in hist.iter(f"{SVG_NS}text")]  # pairs and share of wins per step
    assert "step 1 (n=4, 50% > 0)" in legend and "step 2 (n=4, 75% > 0)" in legend


def test_report_of_a_run_with_steps_only(tmp_path):
    run = write_run(tmp_path / "bare", examples=False, evals=False, pairs=False)
    page = build_report(run)
    assert "No per-example logs" in page and "Evaluations" not in page
    assert len(_svgs(page)) == 4


def test_length_bias_bars_sit_on_their_buckets(run1):
    """The fixture's length differences at step 2 are -8, 0, 0 and 10: buckets 2 tokens wide with empty ones
    between, which must stay on the axis (not be closed up, which would relabel the bars)."""
    acc = next(s for s in _svgs(build_report(run1)) if s.find(f"{SVG_NS}title").text.startswith("Accuracy by length"))
    tips = [r.find(f"{SVG_NS}title").text for r in acc.iter(f"{SVG_NS}rect") if r.find(f"{SVG_NS}title") is not None]
    assert tips == ["accuracy [-8, -6): 1 (n=1)", "accuracy [0, 2): 1 (n=2)", "accuracy [10, 12): 0 (n=1)"]
    notes = [t.text for t in acc.iter(f"{SVG_NS}text") if t.get("class") == "note"]
    assert notes == ["n=1", "n=0", "n=0", "n=0", "n=2", "n=0", "n=0", "n=0", "n=0", "n=1"]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_report_of_a_diverged_run(tmp_path, bad):
    """Non-finite margins at the last logged step (a diverged run) must not take the report down."""
    run = write_run(tmp_path / "diverged")
    step3 = [("p1", 3, "train", bad), ("p2", 3, "train", bad if math.isnan(bad) else -0.5)]
    pq.write_table(examples_table(step3), run / "logs" / "examples-000002.parquet")
    page = build_report(run)
    for svg in _svgs(page):
        assert not re.search(r'="[^"]*(nan|inf)', ET.tostring(svg, encoding="unicode").lower())
    hist = next(s for s in _svgs(page) if s.find(f"{SVG_NS}title").text.startswith("Reward margins"))
    texts = " ".join(t.text or "" for t in hist.iter(f"{SVG_NS}text"))
    assert "step 1 (n=4" in texts and "step 3" in texts and "NaN/inf" in texts


def test_write_report_and_cli(run1, tmp_path):
    assert write_report(run1) == run1 / "report.html" and (run1 / "report.html").exists()
    out = tmp_path / "out" / "r.html"
    r = CliRunner().invoke(report_cmd, [str(run1), "--out", str(out)])
    assert r.exit_code == 0 and out.exists() and str(out) in r.output
    r = CliRunner().invoke(report_cmd, [str(tmp_path)])  # not a run directory
    assert r.exit_code == 1 and "is not a run directory" in r.output and "Traceback" not in r.output


def test_chart_helpers_handle_edge_cases():
    assert _nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert _nice_ticks(-0.8, 1.0) == [-0.5, 0, 0.5, 1.0]
    for svg in (line_chart("one point", [("a", "#000", [3], [0.5])], "x", "y"),
                line_chart("gaps", [("a", "#000", [1, 2, 3, 4], [1.0, float("nan"), None, 2.0])], "x", "y"),
                histogram_chart("flat", [0.0, 1.0, 2.0], [("a", "#000", [0.0, 0.0])], "x", "y"),
                bar_chart("neg", ["-1", "0", "1"], [("a", "#000", [-2.0, float("nan")])], "x", "y", notes=["n=1", "n=0"]),
                line_chart("<b>&", [("<i>", "#000", [1, 2], [1, 2])], "x", "y")):
        root = ET.fromstring(svg)
        assert root.tag == f"{SVG_NS}svg"
        assert not re.search(r'="[^"]*(nan|inf)', svg.lower())  # no coordinate is NaN or infinite


def test_margins_come_from_the_eval_split_when_it_holds_more_pairs(tmp_path):
    run = write_run(tmp_path / "run", evals=False)
    held = [(f"p{i % 5 + 1}", step, "eval", 0.1 * i - 0.3) for step in (0, 2) for i in range(8)]
    pq.write_table(examples_table(held), run / "logs" / "examples-000002.parquet")
    titles = _titles(_svgs(build_report(run)))
    assert "Reward margins (eval), first and last logged step" in titles
    assert any(t.startswith("Accuracy by length difference (eval, step 2)") for t in titles)


def test_header_shows_the_run_settings_and_hardest_pairs_the_end_of_the_prompt(tmp_path):
    import json

    run = write_run(tmp_path / "run", evals=False, pairs=False)
    (run / "run.json").write_text(json.dumps({
        "config": {"model": "tiny-model", "finetune": "qlora", "loss": ["sigmoid", "sft"], "beta": 0.25, "lr": 5e-5,
                   "cache": "ref-cache", "scheduler": "cosine"},
        "cache": {"quantization": "4bit"}, "total_steps": 12, "pairs_per_step": 4, "train_pairs": 40, "eval_pairs": 9}))
    long_prompt = "You are a helpful assistant. " * 20 + "What colour is the sky at noon?"
    rows = [{"id": i, "prompt": long_prompt, "chosen": "blue", "rejected": "green"} for i in ("p1", "p2", "p3", "p4", "p5")]
    pq.write_table(__import__("pyarrow").Table.from_pylist(rows), run / "pairs.parquet")
    page = build_report(run)
    for fact in ("tiny-model", "qlora", "sigmoid,sft", "0.25", "5e-05", "12", "ref-cache (4bit)", "40 / 9"):
        assert f"<td>{fact}</td>" in page, fact
    assert "What colour is the sky at noon?" in page


def test_a_vision_run_shows_thumbnails_inline(tmp_path):
    """The hardest pairs and the widest margins of a vision run carry their images as inline JPEG thumbnails
    (the page stays one file); a file changed since the run says so instead of showing another picture."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from prefcache.core.schemas import EXAMPLE_IMAGES

    run = write_run(tmp_path / "run", evals=False)
    rows = []
    for i in range(1, 6):
        path = tmp_path / f"p{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"p{i}", "position": 0, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                     "path": str(path)})
    rows[1]["sha256"] = "0" * 64  # p2's file is not the picture the run saw
    pq.write_table(pa.Table.from_pylist(rows, schema=EXAMPLE_IMAGES), run / "logs" / "example_images-train.parquet")
    page = build_report(run)
    outline = _Outline()
    outline.feed(page)
    assert "Widest margins (train, last logged step)" in outline.headings
    thumbs = re.findall(r'<img src="data:image/jpeg;base64,[A-Za-z0-9+/=]+" width="(\d+)" height="(\d+)"', page)
    assert thumbs and all(max(int(w), int(h)) == 96 for w, h in thumbs)
    assert [s for s in outline.external if s not in ("img",) and not s.startswith("data:image/jpeg;base64,")] == []
    assert "(p2.png has changed)" in page
    assert "<img" not in build_report(write_run(tmp_path / "text"))  # a text run: no image column
