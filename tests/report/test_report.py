"""``kdet report`` on tiny runs: the page, its figures, its tables and its caches; the page
rendered by headless Chromium where it is installed."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdet.cli import main
from kdet.config import DistillConfig, validate_config
from kdet.distill.run import distill
from kdet.engine.trainer import train
from kdet.report.build import build_report
from kdet.report.collect import PREDICTIONS_CACHE, BENCH_CACHE, report_models, same_weights
from kdet.distill.compare import collect_runs, comparison_rows
from conftest import tiny_config_dict

DISTILLED_RED = (0xD6, 0x27, 0x28)  # the first distilled student's colour in every figure


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def runs(shapes_voc, teacher_checkpoint, tmp_path_factory) -> list[Path]:
    """Baseline and distilled student, seeds 0 and 1, and the teacher's own training run."""
    root = tmp_path_factory.mktemp("report_runs")
    paths = []
    for seed in (0, 1):
        base = tiny_config_dict(shapes_voc, epochs=1)
        base["seed"] = seed
        train(validate_config(base), root / f"base{seed}", log=quiet, progress=False)
        kd = tiny_config_dict(shapes_voc, epochs=1)
        kd["seed"] = seed
        kd["teacher"] = {"checkpoint": str(teacher_checkpoint)}
        kd["distill"] = {"terms": [{"loss": "objectness_scaled", "weight": 1.0, "args": {"box_weight": 0.05}}]}
        distill(validate_config(kd, schema=DistillConfig), root / f"kd{seed}", log=quiet, progress=False)
        paths += [root / f"base{seed}", root / f"kd{seed}"]
    return [*paths, teacher_checkpoint.parent]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("report")
    lines: list[str] = []
    build_report(runs, out, runs=2, warmup=0, samples=2, log=lines.append)
    return out, lines


def embedded_images(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with ``first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_page_is_self_contained_with_every_figure(report):
    out, _ = report
    html = (out / "index.html").read_text()
    images = embedded_images(html)
    names = ["ap_vs_latency", "per_class_ap", "pr_curves", "samples", "val_ap", "losses"]
    assert len(images) == len(names)
    for image in images:
        image.load()
        assert image.format == "PNG" and min(image.size) > 100
        assert np.asarray(image.convert("L")).std() > 5  # something is drawn, not a blank canvas
    # nothing is fetched from elsewhere: no external source, no script
    assert not re.search(r'(src|href)="(?!data:)', html) and "<script" not in html
    markdown = (out / "report.md").read_text()
    for name in names:
        assert (out / f"{name}.png").is_file() and f"]({name}.png)" in markdown


def results_rows(markdown: str) -> dict[str, list[str]]:
    return {row[0]: row for row in table_rows(markdown, " | AP@[.5:.95]")}


def test_results_table_has_a_row_per_model_with_the_expected_columns(report):
    out, lines = report
    markdown = (out / "report.md").read_text()
    rows = results_rows(markdown)
    assert list(rows) == ["teacher", "baseline", "distilled"]
    header = next(line for line in markdown.splitlines() if line.startswith("|  | AP@[.5:.95]"))
    assert [h.strip() for h in header.strip("|").split(" | ")] == ["", "AP@[.5:.95]", "AP50", "AP75", "VOC mAP@0.5 11-pt",
        "VOC mAP@0.5 all-pt", "params", "GFLOPs", "PyTorch CPU ms", "ONNX Runtime CPU ms", "ΔAP vs baseline", "gap closed"]
    for label in rows:  # PyTorch and ONNX Runtime latency, measured
        assert float(rows[label][8]) > 0 and float(rows[label][9]) > 0
    assert rows["teacher"][6] == "1.00M" and rows["baseline"][6] == rows["distilled"][6] == "0.45M"
    classes = table_rows(markdown, "class")
    assert [row[0] for row in classes] == ["bar", "square"] and all(len(row) == 4 for row in classes)
    # the teacher's own training run joins the teacher's row instead of standing as a second baseline
    assert any("trained the teacher" in line for line in lines)


def with_metrics(runs: list[Path], root: Path, aps: dict[str, float]) -> list[Path]:
    """Copies of the runs whose results.json say AP@[.5:.95] = ``aps[name]`` (teacher: ``"teacher"``)."""
    copies = []
    for run in runs:
        copy = root / run.name
        shutil.copytree(run, copy)
        results = json.loads((copy / "results.json").read_text())
        if run.name in aps:
            results["metrics"]["coco"]["AP"] = aps[run.name]
            results["metrics"]["coco"]["per_class"]["bar"]["AP"] = aps[run.name] / 2
        if "teacher" in results:
            results["teacher"]["metrics"]["coco"]["AP"] = aps["teacher"]
        (copy / "results.json").write_text(json.dumps(results))
        copies.append(copy)
    return copies


def test_table_numbers_are_means_paired_deltas_and_gap_closed(runs, tmp_path):
    aps = {"base0": 0.30, "base1": 0.34, "kd0": 0.36, "kd1": 0.38, "teacher": 0.50}
    copies = with_metrics(runs[:4], tmp_path / "runs", aps)
    build_report(copies, tmp_path / "out", latency=False, samples=0, log=quiet)
    markdown = (tmp_path / "out" / "report.md").read_text()
    rows = results_rows(markdown)
    assert rows["teacher"][1] == "0.500"
    assert rows["baseline"][1] == "0.320 ± 0.028" and rows["distilled"][1] == "0.370 ± 0.014"
    assert rows["distilled"][10] == "+0.050 ± 0.014"  # (0.06, 0.04) paired by seed
    assert rows["distilled"][11] == "28%"  # (0.37 - 0.32) / (0.50 - 0.32)
    assert rows["baseline"][10] == rows["baseline"][11] == "-"
    classes = {row[0]: row for row in table_rows(markdown, "class")}
    assert classes["bar"][2] == "0.160 ± 0.014" and classes["bar"][3] == "0.185 ± 0.007"


def test_cached_predictions_are_the_models_detections(report, runs, shapes_voc):
    from kdet.data import read_dataset
    from kdet.engine.checkpoint import load_detector
    from kdet.engine.evaluate import predict

    records = read_dataset(shapes_voc, "auto").split("test")
    cache = json.loads((runs[0] / PREDICTIONS_CACHE).read_text())
    (entry,) = cache["entries"].values()
    detector, _ = load_detector(runs[0] / "best.pt")
    direct = predict(detector, records, 64, batch_size=4)
    assert sum(len(p.scores) for p in direct) > 0
    for expected in direct:
        cached = entry["images"][expected.image_id]
        assert np.allclose(cached["boxes"], expected.boxes, atol=0.01) if len(expected.scores) else not cached["boxes"]
        assert np.allclose(cached["scores"], expected.scores, atol=1e-5)
        assert cached["labels"] == expected.labels.tolist()
    bench = json.loads((runs[0] / BENCH_CACHE).read_text())
    (timing,) = bench["entries"].values()
    assert timing["runs"] == 2 and timing["pytorch"]["latency_ms_median"] > 0 and timing["onnxruntime"]["latency_ms_median"] > 0


def test_second_report_reads_the_caches(report, runs, tmp_path):
    lines: list[str] = []
    build_report(runs, tmp_path / "again", runs=2, warmup=0, samples=0, log=lines.append)
    assert not any("measuring latency" in line or "predicting" in line for line in lines)
    assert sum("latency from" in line for line in lines) == 3
    # asking for more timed runs than cached measures again
    lines.clear()
    build_report(runs[:2], tmp_path / "more", runs=3, warmup=0, samples=0, log=lines.append)
    assert any("measuring latency" in line for line in lines)
    assert "samples.png" not in (tmp_path / "again" / "report.md").read_text()


def test_same_weights_sees_an_fp16_copy(teacher_checkpoint, tmp_path):
    import torch

    payload = torch.load(teacher_checkpoint, map_location="cpu", weights_only=False)
    half = dict(payload, state_dict={k: v.half() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    torch.save(half, tmp_path / "half.pt")
    assert same_weights(teacher_checkpoint, teacher_checkpoint) == "same weights"
    assert same_weights(teacher_checkpoint, tmp_path / "half.pt") == "same weights, one copy stored in fp16"
    changed = dict(payload, state_dict=dict(payload["state_dict"]))
    name = next(k for k, v in changed["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    changed["state_dict"][name] = changed["state_dict"][name] + 1
    torch.save(changed, tmp_path / "changed.pt")
    assert same_weights(teacher_checkpoint, tmp_path / "changed.pt") is None


def test_models_are_labelled_by_role(runs):
    collected = collect_runs(runs[:4])
    models = report_models(collected, comparison_rows(collected), quiet)
    assert [(m.label, m.role) for m in models] == [("teacher", "teacher"), ("baseline", "baseline"), ("distilled", "distilled")]
    assert [r.seed for r in models[1].runs] == [0, 1] and models[1].checkpoint.endswith("base0/best.pt")


def test_command_line_and_bad_input(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs[:4]), "--out", str(tmp_path / "r"), "--no-latency", "--samples", "1"]) == 0
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "Latency (--no-latency)" in markdown and all(row[9] == "-" for row in results_rows(markdown).values())
    (tmp_path / "unfinished").mkdir()
    assert main(["report", str(tmp_path / "unfinished"), "--out", str(tmp_path / "x")]) == 2
    assert "results.json" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    shutil.copytree(runs[0], damaged)
    (damaged / "results.json").write_text("{broken")
    assert main(["report", str(damaged), "--out", str(tmp_path / "z")]) == 2
    assert f"{damaged / 'results.json'}: not readable" in capsys.readouterr().err
    assert main(["report", *map(str, runs[:2]), "--runs", "0", "--out", str(tmp_path / "y")]) == 2
    assert "--runs must be at least 1" in capsys.readouterr().err


def chromium() -> str | None:
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if found is None and os.environ.get("KDET_REQUIRE_CHROMIUM") == "1":
        pytest.fail("KDET_REQUIRE_CHROMIUM=1 but no chromium on PATH (Debian: apt-get install chromium)")
    return found


def screenshot(browser: str, page: Path, png: Path) -> np.ndarray:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1300,6000",
                    f"--screenshot={png}", page.resolve().as_uri()], check=True, capture_output=True, timeout=180)
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def red_pixels(shot: np.ndarray) -> int:
    return int((np.abs(shot - np.array(DISTILLED_RED)).sum(axis=2) < 40).sum())


def test_chromium_renders_the_figures(report, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); .ci/run installs it")
    out, _ = report
    shot = screenshot(browser, out / "index.html", tmp_path / "page.png")
    # the distilled student's red is drawn only inside the figures: the page shows them ...
    assert red_pixels(shot) > 200
    assert (shot < 100).all(axis=2).sum() > 1000  # ... and its text
    # ... and a copy of the page whose images cannot be decoded shows none of it
    broken = (out / "index.html").read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA")
    (tmp_path / "broken.html").write_text(broken)
    assert red_pixels(screenshot(browser, tmp_path / "broken.html", tmp_path / "broken.png")) < 20


def test_a_class_with_no_box_in_the_test_split_is_undefined_not_a_crash(runs, shapes_voc, tmp_path):
    import xml.etree.ElementTree as ET

    import yaml

    data = tmp_path / "data"
    shutil.copytree(shapes_voc, data)
    square_only = [xml.stem for xml in sorted((data / "Annotations").glob("*.xml"))
                   if {o.findtext("name") for o in ET.parse(xml).getroot().iter("object")} == {"square"}]
    assert square_only
    (data / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{stem}\n" for stem in square_only))  # no bar in it
    copies = []
    for run in runs[:4]:
        copy = tmp_path / "runs" / run.name
        shutil.copytree(run, copy)
        config = yaml.safe_load((copy / "config.yaml").read_text())
        config["data"]["path"] = str(data)
        (copy / "config.yaml").write_text(yaml.safe_dump(config))
        results = json.loads((copy / "results.json").read_text())
        for scored in (results, results.get("teacher")):
            if scored:  # what evaluating on that split gives: no AP for bar
                scored["metrics"]["coco"]["per_class"]["bar"] = {"AP": None, "AP50": None}
                scored["metrics"]["voc"]["per_class"]["bar"].update(AP50_11pt=None, AP50_all=None, num_gt=0)
        (copy / "results.json").write_text(json.dumps(results))
        copies.append(copy)

    build_report(copies, tmp_path / "out", latency=False, samples=0, log=quiet)

    classes = {row[0]: row[1:] for row in table_rows((tmp_path / "out" / "report.md").read_text(), "class")}
    assert classes["bar"] == ["undefined (no box of bar in the test split)"] * 3
    assert all(cell != "-" and not cell.startswith("undefined") for cell in classes["square"])
