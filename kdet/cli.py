"""The ``kdet`` command."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _log(message: str) -> None:
    console.print(message, markup=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def cmd_data_check(args: argparse.Namespace) -> int:
    from .data import read_dataset, resolve_data_path
    from .data.check import render_summary, summarize

    index = read_dataset(resolve_data_path(args.path), args.format, verify_images=True)
    summary = summarize(index)
    if args.labelled_fraction is not None and args.labelled_fraction < 1:
        from .data.labelled import keep_labelled, labelled_record

        if args.train_split not in index.splits:
            raise ValueError(f"--labelled-fraction: {index.missing_split_message(args.train_split)}; name the training split "
                             f"with --train-split")
        part = keep_labelled(index, args.train_split, args.labelled_fraction, args.labelled_seed)
        summary["labelled"] = labelled_record(part, args.train_split, args.labelled_fraction, args.labelled_seed, ids=args.json)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        render_summary(summary, console)
    for error in summary["errors"]:
        print(f"kdet data check: error: {error}", file=sys.stderr)
    return 1 if summary["errors"] else 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from .data import keep_classes, read_dataset, resolve_data_path
    from .data.export import export_coco, export_voc, export_yolo

    index = read_dataset(resolve_data_path(args.path), args.format)
    if args.classes is not None:  # an empty --classes "" is refused by keep_classes, not ignored
        index, removed = keep_classes(index, [name.strip() for name in args.classes.split(",") if name.strip()])
        left_out = ", ".join(f"{name} {count}" for name, count in removed.items()) or "none"
        _log(f"kept the boxes of {', '.join(index.class_names)}; boxes removed: {left_out}")
    writer = {"coco": export_coco, "yolo": export_yolo, "voc": export_voc}[args.to]
    out = writer(index, args.out)
    _log(f"wrote {args.to.upper()} copy of {index.root} ({len(index.all_records())} images, splits {', '.join(index.splits)}) to {out}")
    if index.problems:
        _log(f"{len(index.problems)} problem(s) in the source were handled as `kdet data check` reports them")
    return 0


# ---------------------------------------------------------------------------------------------
# train / eval / predict / profile
# ---------------------------------------------------------------------------------------------
def default_run_dir(config_path: str | None, name: str = "run") -> Path:
    stem = Path(config_path).stem if config_path else name
    base = Path("runs") / stem
    candidate, n = base, 2
    while (candidate / "last.pt").exists():
        candidate, n = Path(f"{base}-{n}"), n + 1
    return candidate


def config_path(name: str) -> Path:
    """A config file, or the name of a recipe shipped in kdet/configs (``bccd_teacher``)."""
    from .demo import packaged_config

    path = Path(name)
    return path if path.exists() or path.suffix in (".yaml", ".yml") else packaged_config(name)


def _process_group(config):
    """The torchrun process group for a training run (nothing outside torchrun) and the log of
    this process: rank 0 logs, the others stay quiet."""
    from .engine import distributed
    from .engine.setup import pick_device

    group = distributed.process_group_from_env(pick_device(config.train.device))
    quiet = distributed.launched_with() > 1 and int(os.environ.get("RANK", "0")) != 0
    return group, (lambda _: None) if quiet else _log


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_student_config
    from .engine.trainer import train

    config, was_distill = load_student_config(config_path(args.config), args.set)
    group, log = _process_group(config)
    if was_distill:
        log("a distillation config: training its student without the teacher (the baseline for kdet distill)")
    if config.data.unlabelled:
        log("data.unlabelled: only kdet distill reads unlabelled images; kdet train trains on the labelled ones (the baseline)")
    if args.resume and not args.out:
        raise ValueError("--resume needs --out RUN_DIR: the run to continue")
    out = Path(args.out) if args.out else default_run_dir(args.config)
    log(f"run directory: {out}")
    with group:
        train(config, out, resume=args.resume, log=log, progress=console.is_terminal)
    if config.model.family == "ultralytics" and int(os.environ.get("RANK", "0")) == 0:
        from .models.ultralytics import write_ultralytics_copy

        write_ultralytics_copy(out, log)
    return 0


# ---------------------------------------------------------------------------------------------
# check / distill / compare
# ---------------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from .config import DistillConfig, load_config
    from .distill.report import render_pairing
    from .distill.run import check
    from .distill.setup import report_dict

    config = load_config(config_path(args.config), args.set, schema=DistillConfig)
    report = check(config, log=_log if not args.json else (lambda _: None))
    if args.json:
        print(json.dumps(report_dict(report), indent=1))
    else:
        render_pairing(report, console)
    return 0 if report.ok else 1


def cmd_distill(args: argparse.Namespace) -> int:
    from .config import DistillConfig, load_config
    from .distill.run import distill

    config = load_config(config_path(args.config), args.set + _teacher_cache_overrides(args), schema=DistillConfig)
    group, log = _process_group(config)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out RUN_DIR: the run to continue")
    out = Path(args.out) if args.out else default_run_dir(args.config)
    log(f"run directory: {out}")
    with group:
        distill(config, out, resume=args.resume, log=log, progress=console.is_terminal)
    return 0


def _teacher_cache_overrides(args: argparse.Namespace) -> list[str]:
    """``--teacher-cache DIR`` is ``--set distill.cache.dir=DIR``."""
    return [f"distill.cache.dir={json.dumps(args.teacher_cache)}"] if args.teacher_cache else []


def cmd_cache(args: argparse.Namespace) -> int:
    from .config import DistillConfig, load_config
    from .distill.run import build_cache

    config = load_config(config_path(args.config), args.set + _teacher_cache_overrides(args), schema=DistillConfig)
    # with --json, stdout holds the JSON alone and the progress lines go to stderr
    log = (lambda message: err_console.print(message, markup=False, soft_wrap=True)) if args.json else _log
    stats = build_cache(config, log=log)
    if args.json:
        print(json.dumps(stats, indent=1))
    return 0


def cmd_chain(args: argparse.Namespace) -> int:
    from .config import ChainConfig, load_config
    from .distill.chain import run_chain
    from .distill.compare import render_comparison

    config = load_config(config_path(args.config), args.set + _teacher_cache_overrides(args), schema=ChainConfig)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    _log(f"chain directory: {out}")
    rows = run_chain(config, out, log=_log, progress=console.is_terminal, check_only=args.check)
    if rows:
        render_comparison(rows, console)
        _log(f"table also in {out / 'compare.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .distill.compare import collect_runs, comparison_rows, render_comparison

    runs = collect_runs([Path(p) for p in args.runs])
    rows = comparison_rows(runs)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.markdown:
        from .distill.compare import markdown_table

        print(markdown_table(rows))
    else:
        render_comparison(rows, console)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report.build import build_report

    build_report(args.run_dirs, args.out, latency=not args.no_latency, runs=args.bench_runs, warmup=args.warmup,
                 threads=args.threads, samples=args.samples, score_thresh=args.score_thresh, log=_log)
    return 0


def _records_for_model(args: argparse.Namespace, class_names: list[str]):
    """Read the evaluation data and map its classes onto the model's, by name."""
    from .data import read_dataset, remap_classes, resolve_data_path

    index = read_dataset(resolve_data_path(args.data), args.format)
    records = index.split(args.split)
    return remap_classes(records, index.class_names, class_names), index


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine.checkpoint import load_detector
    from .engine.evaluate import evaluate_model
    from .engine.metrics import format_metrics_table

    model, payload = load_detector(args.checkpoint)
    records, _ = _records_for_model(args, model.class_names)
    metrics = evaluate_model(model, records, payload["input_size"], batch_size=args.batch_size,
                             score_thresh=args.score_thresh, nms_iou=args.nms_iou)
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        console.print(format_metrics_table(metrics, model.class_names))
    return 0


def _collect_images(inputs: list[str]) -> list[Path]:
    images: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image or folder")
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(inputs)}")
    return images


def cmd_predict(args: argparse.Namespace) -> int:
    from .engine.checkpoint import load_detector
    from .engine.predict import predict_images

    model, payload = load_detector(args.checkpoint)
    images = _collect_images(args.inputs)
    out = Path(args.out)
    results, skipped = predict_images(model, images, payload["input_size"], out, score_thresh=args.score_thresh, nms_iou=args.nms_iou)
    total = sum(len(r["detections"]) for r in results)
    _log(f"{len(results)} image(s), {total} detection(s) at score >= {args.score_thresh}: drawn in {out}, listed in {out / 'predictions.json'}")
    for item in skipped:
        print(f"kdet predict: skipped {item['image']}: {item['error']}", file=sys.stderr)
    if skipped:
        print(f"kdet predict: {len(skipped)} of {len(images)} image(s) skipped (listed above); the others were predicted",
              file=sys.stderr)
    return 0 if results else 1


def cmd_profile(args: argparse.Namespace) -> int:
    from .engine.profile import profile_model

    model, input_size = _model_from_checkpoint_or_config(args.model, args.set, args.num_classes)
    size = args.input_size or input_size
    profile = profile_model(model, size, runs=args.runs, threads=args.threads)
    if args.json:
        print(json.dumps(profile.__dict__, indent=1))
    else:
        _log(f"parameters {profile.params / 1e6:.2f}M, FLOPs {profile.flops / 1e9:.2f}G at {size}px, "
             f"CPU latency {profile.latency_ms_median:.1f} ms/image (batch 1, {profile.threads} threads, median of {args.runs})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .engine.export import export_checkpoint

    if args.format == "ultralytics":
        from .engine.checkpoint import load_detector
        from .models.ultralytics import save_ultralytics_checkpoint

        model, payload = load_detector(args.checkpoint)
        if model.family != "ultralytics":
            raise ValueError(f"--format ultralytics writes models of the ultralytics family; {args.checkpoint} is {model.family}")
        source = Path(args.checkpoint)
        out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "ultralytics.pt"
        out = out / "ultralytics.pt" if out.is_dir() else out
        save_ultralytics_checkpoint(model, out, payload["input_size"], payload["model_config"].get("channels"))
        _log(f"wrote {out}, an Ultralytics checkpoint: YOLO('{out}').predict(...) / .val(...) / .export(...)")
        return 0

    report, source = export_checkpoint(args.checkpoint, args.out, dynamic_batch=args.dynamic_batch, fp16=args.fp16, opset=args.opset)
    batch = "dynamic batch" if report.dynamic_batch else f"batch {report.batch}"
    precision = "fp16, fp32 inputs/outputs" if report.fp16 else "fp32"
    _log(f"wrote {report.path} ({report.bytes / 1e6:.1f} MB, {precision}, opset {report.opset}, {batch}); onnx.checker passed")
    tol = report.tolerance
    _log(f"ONNX Runtime vs PyTorch on {source}: boxes max |diff| {report.max_box_diff:.2g} px (tolerance {tol.boxes:g}), "
         f"scores {report.max_score_diff:.2g} (tolerance {tol.scores:g})")
    _log(f"outputs: boxes [N, {report.num_boxes}, 4] xyxy input pixels, scores [N, {report.num_boxes}, C], before NMS; "
         "apply NMS with kdet.engine.export.postprocess(boxes, scores, score_thresh, nms_iou, max_det)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .engine.checkpoint import load_detector, model_payload, save_atomic
    from .models import build_model
    from .models.prune import channel_plan, prune_detector

    model, payload = load_detector(args.checkpoint)
    config = ModelConfig.model_validate(payload["model_config"])
    if config.channels:
        raise ValueError(f"{args.checkpoint} is pruned already; prune the unpruned model with a larger --ratio")
    size = payload["input_size"]
    batches = None
    if args.method == "taylor":
        if not args.data:
            raise ValueError("--method taylor needs --data (training images whose loss gradients rank the channels)")
        from .data.pipeline import DetectionDataset, collate

        records, _ = _records_for_model(argparse.Namespace(data=args.data, format="auto", split=args.split), model.class_names)
        dataset = DetectionDataset(records[: 4 * args.batches], size, augment=None, cache="none")
        samples = [dataset[i] for i in range(len(dataset))]
        batches = [collate(samples[i:i + 4])[:2] for i in range(0, len(samples), 4)]
    prune_detector(model, size, args.ratio, method=args.method, batches=batches, log=_log)
    unpruned = build_model(config.model_copy(update={"weights": None, "pretrained_backbone": None}), model.class_names, size)
    pruned_config = config.model_copy(update={"channels": channel_plan(model, unpruned), "weights": None, "pretrained_backbone": None})
    out = Path(args.out)
    save_atomic(model_payload(model, pruned_config, size, extra={"pruned_from": str(args.checkpoint), "prune_ratio": args.ratio,
                                                                 "prune_method": args.method}), out)
    load_detector(out, log=lambda _: None)  # the plan rebuilds it: every command can read the file
    _log(f"wrote {out}: distil it with the unpruned model as teacher (model.weights: {out}, teacher.checkpoint: "
         f"{args.checkpoint}), or fine-tune it (kdet train with model.weights: {out})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .engine.bench import bench, format_bench

    report = bench(args.model, checkpoint=args.checkpoint, batch=args.batch, threads=args.threads, runs=args.runs, warmup=args.warmup)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _log(format_bench(report))
    return 0


def _model_from_checkpoint_or_config(path: str, overrides: list[str], num_classes: int):
    """A trained checkpoint, or an untrained model built from a config's ``model`` section
    (default anchors, ``num_classes`` placeholder classes) for sizing before training."""
    from .engine.checkpoint import load_detector

    if path.endswith((".yaml", ".yml")) or not (path.startswith("bundled:") or Path(path).exists() or path.endswith(".pt")):
        from .config import load_student_config
        from .models import build_model

        # a shipped recipe name (bccd_student) or a file; a distillation config is sized by its student
        config, _ = load_student_config(config_path(path), overrides, base={"data": {"path": "unused"}})
        model_config = config.model
        if model_config.anchors == "auto":
            model_config = model_config.model_copy(update={"anchors": "default"})
        names = [f"class{i}" for i in range(num_classes)]
        return build_model(model_config, names, config.data.input_size).eval(), config.data.input_size
    model, payload = load_detector(path)
    return model, payload["input_size"]


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, report=not args.no_report, log=_log, progress=console.is_terminal)
    return 0


# ---------------------------------------------------------------------------------------------
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction 0 < F <= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdet",
        description="Knowledge distillation for object detectors: train a teacher, check that it can teach a student, "
        "distil, and compare teacher, baseline and distilled student, on VOC, COCO or YOLO data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="inspect or convert a dataset").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check_help = ("read a dataset and report its contents and every problem found; exit code 1 when no usable image "
                  "is left or a split the dataset names is lost")
    check = data.add_parser("check", help=check_help, description=check_help)
    check.add_argument("path", help="dataset folder, or bundled:bccd")
    check.add_argument("--format", default="auto", choices=["auto", "voc", "coco", "yolo"])
    check.add_argument("--json", action="store_true", help="print a machine-readable summary")
    check.add_argument("--labelled-fraction", type=_fraction, metavar="F", help="also show which images of the training "
                       "split keep their labels with data.labelled_fraction F (0 < F <= 1); --json lists them")
    check.add_argument("--labelled-seed", type=int, default=0, metavar="N", help="data.labelled_seed (default 0)")
    check.add_argument("--train-split", default="train", metavar="NAME", help="data.train_split (default train)")
    check.set_defaults(func=cmd_data_check)
    convert = data.add_parser("convert", help="write a copy of a dataset in another format")
    convert.add_argument("path", help="dataset folder, or bundled:bccd")
    convert.add_argument("--format", default="auto", choices=["auto", "voc", "coco", "yolo"], help="input format")
    convert.add_argument("--to", required=True, choices=["voc", "coco", "yolo"])
    convert.add_argument("--out", required=True)
    convert.add_argument("--classes", help="comma-separated class names: keep only their boxes, these as the classes (the data "
                         "of a specialist teacher); every image stays")
    convert.set_defaults(func=cmd_data_convert)

    torchrun_note = ("Several processes (GPUs, or CPU processes) train one model together when started with torchrun: "
                     "torchrun --nproc-per-node N -m kdet %s CONFIG ... train.batch_size is the batch of all processes "
                     "together; rank 0 alone writes the run directory; --resume works with any number of processes.")
    train = sub.add_parser("train", help="train a detector from a YAML config",
                           description="Train a detector from a YAML config. " + torchrun_note % "train")
    train.add_argument("config", help="a YAML config file, or a recipe name from kdet/configs: bccd_teacher, bccd_student, bccd_student_dfl, bccd_fcos, demo")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=10 (repeatable)")
    train.add_argument("--out", help="run directory (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    train.set_defaults(func=cmd_train)

    check_help = ("can this teacher teach this student? pairing report of a distillation config, before training (one "
                  "report per teacher when there are several; also what online distillation reverses and what unlabelled "
                  "images and pseudo-labels feed)")
    check_pair = sub.add_parser("check", help=check_help, description=check_help)
    check_pair.add_argument("config", help="a distillation YAML config, or a recipe name (bccd_distill)")
    check_pair.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    check_pair.add_argument("--json", action="store_true", help="print the report as JSON")
    check_pair.set_defaults(func=cmd_check)

    distill = sub.add_parser("distill", help="train a student against a frozen teacher, or several, its own EMA (teacher: "
                             "{self: ema}) or a teacher trained alongside (teacher.train: true), optionally on unlabelled "
                             "images too (data.unlabelled); runs `kdet check` first",
                             description="Train a student against its teacher(s) (runs `kdet check` first): one frozen "
                             "teacher, a list of teachers (teacher: [...]), the student's own moving average (teacher: {self: "
                             "ema}), or a teacher trained in the same step (teacher.train: true, saved as teacher_best.pt); "
                             "data.unlabelled adds unlabelled images to every batch for the distillation terms, with "
                             "distill.pseudo_labels the teachers' boxes as targets on them. "
                             + torchrun_note % "distill" + " The teacher cache is built by rank 0 and read by every process.")
    distill.add_argument("config", help="a distillation YAML config, or a recipe name from kdet/configs: bccd_distill")
    distill.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. distill.features=false or 'distill.terms=[{loss: kl}]' (repeatable)")
    distill.add_argument("--out", help="run directory (default: runs/<config name>)")
    distill.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    distill.add_argument("--teacher-cache", metavar="DIR", help="read the teacher's outputs from a cache in DIR (built first "
                         "where missing) instead of running the teacher on every batch; same as --set distill.cache.dir=DIR")
    distill.set_defaults(func=cmd_distill)

    cache = sub.add_parser("cache", help="build the teacher-output cache a kdet distill run will read, without training")
    cache.add_argument("config", help="a distillation YAML config, or a recipe name from kdet/configs: bccd_distill")
    cache.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. train.epochs=20 or distill.cache.views=5 (repeatable)")
    cache.add_argument("--teacher-cache", metavar="DIR", help="the cache directory (same as --set distill.cache.dir=DIR)")
    cache.add_argument("--json", action="store_true", help="print what the build did as JSON")
    cache.set_defaults(func=cmd_cache)

    chain_help = ("teacher-assistant chain or born-again generations: distil the teacher through the chain: stages into the "
                  "final student, one run directory per stage under --out, plus the baseline and the direct distillation, "
                  "and compare them; finished runs are skipped, an interrupted one resumed")
    chain = sub.add_parser("chain", help=chain_help, description=chain_help)
    chain.add_argument("config", help="a distillation YAML config with a chain: list of stages ({name, model: {keys that "
                       "differ from the final student's model}}; {} repeats the student's model: born-again generations)")
    chain.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    chain.add_argument("--out", help="folder of the chain's run directories (default: runs/<config name>)")
    chain.add_argument("--check", action="store_true", help="pair every stage with its teacher and stop; exit code 2 if one "
                       "cannot be paired")
    chain.add_argument("--teacher-cache", metavar="DIR", help="teacher-output cache of every stage (same as --set distill.cache.dir=DIR)")
    chain.set_defaults(func=cmd_chain)

    compare = sub.add_parser("compare", help="table of teacher, baseline and distilled students from run directories")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of kdet train / kdet distill")
    compare.add_argument("--markdown", action="store_true", help="print a Markdown table")
    compare.add_argument("--json", action="store_true", help="print the rows as JSON")
    compare.set_defaults(func=cmd_compare)

    report = sub.add_parser("report", help="HTML page (self-contained) and Markdown twin comparing teacher, baseline and distilled "
                            "students: tables, latency, per-class AP, precision-recall, training curves, sample detections")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of kdet train / kdet distill")
    report.add_argument("--out", default="report", help="folder for index.html, report.md and its PNG figures (default: report)")
    report.add_argument("--runs", dest="bench_runs", type=int, default=10, metavar="N",
                        help="timed runs per model for the latency, median taken (default 10); cached in each run's bench.json")
    report.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed runs first (default 2)")
    report.add_argument("--threads", type=int, default=1, metavar="N", help="torch and ONNX Runtime threads for the latency (default 1)")
    report.add_argument("--no-latency", action="store_true",
                        help="measure no latency: show the PyTorch latency each run recorded in results.json, no ONNX Runtime")
    report.add_argument("--samples", type=int, default=4, metavar="N", help="test images drawn with every model's detections (default 4; 0: none)")
    report.add_argument("--score-thresh", type=float, default=0.25, help="score threshold of the drawn detections (default 0.25)")
    report.set_defaults(func=cmd_report)

    evaluate = sub.add_parser("eval", help="COCO AP@[.5:.95]/AP50/AP75/APs/m/l and VOC mAP@0.5 (11-point, all-point), per class")
    evaluate.add_argument("checkpoint", help="a kdet checkpoint (best.pt, or a run directory for its best.pt), or bundled:bccd_teacher")
    evaluate.add_argument("--data", required=True, help="dataset folder, or bundled:bccd")
    evaluate.add_argument("--format", default="auto", choices=["auto", "voc", "coco", "yolo"])
    evaluate.add_argument("--split", default="test", help="split to score (default: test)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--score-thresh", type=float, default=0.001)
    evaluate.add_argument("--nms-iou", type=float, default=0.6)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    predict_help = ("draw a checkpoint's detections on images (an image that cannot be read is skipped and named; exit "
                    "code 1 when none could be)")
    predict = sub.add_parser("predict", help=predict_help, description=predict_help)
    predict.add_argument("checkpoint", help="a kdet checkpoint (best.pt, or a run directory for its best.pt), or bundled:bccd_teacher")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    predict.add_argument("--out", required=True)
    predict.add_argument("--score-thresh", type=float, default=0.25)
    predict.add_argument("--nms-iou", type=float, default=0.6)
    predict.set_defaults(func=cmd_predict)

    profile = sub.add_parser("profile", help="parameters, FLOPs and CPU latency of a checkpoint or a model config")
    profile.add_argument("model", help="a checkpoint (.pt), a config (.yaml) or a shipped recipe name (bccd_student)")
    profile.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    profile.add_argument("--input-size", type=int)
    profile.add_argument("--num-classes", type=int, default=3, help="classes of a model built from a config (default 3)")
    profile.add_argument("--threads", type=int)
    profile.add_argument("--runs", type=int, default=20)
    profile.add_argument("--json", action="store_true")
    profile.set_defaults(func=cmd_profile)

    export = sub.add_parser("export", help="write a checkpoint as an ONNX model (boxes and per-class scores before NMS), checked against PyTorch")
    export.add_argument("checkpoint", help="a kdet checkpoint (best.pt, or a run directory for its best.pt), or bundled:bccd_teacher")
    export.add_argument("--format", default="onnx", choices=["onnx", "ultralytics"],
                        help="output format (default: onnx); ultralytics: an Ultralytics checkpoint of a model of that family "
                             "(default ultralytics.pt beside the checkpoint)")
    export.add_argument("--out", help="output file, or an existing folder to write the default name into (default: the "
                        "checkpoint's name with .onnx, .fp16.onnx with --fp16; for bundled:NAME, NAME.onnx in the current directory)")
    export.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic (default: a fixed batch of 1)")
    export.add_argument("--fp16", action="store_true", help="fp16 weights and arithmetic (half the file), converted with onnxruntime's float16 "
                        "converter; inputs and outputs stay fp32. ONNX Runtime runs it on the CPU, more slowly than fp32")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset, 11 to 20 (default 17)")
    export.set_defaults(func=cmd_export)

    prune_help = ("remove a fraction of the channels of a trained detector (torch-pruning's dependency graph, pip install "
                  "kdet[prune]; the yolo and ultralytics families); the checkpoint records its channel plan, so every command "
                  "reads it and model.weights: PRUNED.pt trains or distils it")
    prune = sub.add_parser("prune", help=prune_help, description=prune_help)
    prune.add_argument("checkpoint", help="a kdet checkpoint (best.pt, a run directory, bundled:bccd_teacher) or an Ultralytics one")
    prune.add_argument("--ratio", type=float, default=0.5, help="fraction of the channels removed from every prunable layer (default 0.5)")
    prune.add_argument("--method", default="l1", choices=["l1", "taylor"], help="channel ranking: L1 norm of the weights "
                       "(default), or first-order Taylor estimate from the loss gradients on --data")
    prune.add_argument("--data", help="taylor: dataset whose images rank the channels (a few batches of --split)")
    prune.add_argument("--split", default="train", help="taylor: split of --data (default train)")
    prune.add_argument("--batches", type=int, default=4, help="taylor: batches of 4 images (default 4)")
    prune.add_argument("--out", required=True, help="the pruned checkpoint to write")
    prune.set_defaults(func=cmd_prune)

    bench = sub.add_parser("bench", help="parameters, FLOPs, latency and images/s in PyTorch and ONNX Runtime (CPU), at a batch size")
    bench.add_argument("model", metavar="CHECKPOINT_OR_ONNX", help="a checkpoint (.pt, or bundled:bccd_teacher; exported to ONNX on the fly) or an .onnx file")
    bench.add_argument("--checkpoint", help="with an .onnx file: the checkpoint it was exported from, to bench PyTorch and count FLOPs too")
    bench.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    bench.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: torch's current count)")
    bench.add_argument("--runs", type=int, default=50, help="timed runs (default 50)")
    bench.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="distil the bundled BCCD teacher into a small student, train a baseline student, compare "
                          "the three and write the report (OUT/report/index.html)")
    demo.add_argument("--out", default="runs/demo", help="folder of the demo's runs and report (default: runs/demo)")
    demo.add_argument("--epochs", type=int, help="override the demo's number of epochs")
    demo.add_argument("--no-report", action="store_true", help="stop after the comparison table, write no report")
    demo.set_defaults(func=cmd_demo)
    return parser


TORCHRUN_COMMANDS = ("train", "distill")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in TORCHRUN_COMMANDS:
        print(f"kdet {args.command}: error: runs in one process; only kdet {' and kdet '.join(TORCHRUN_COMMANDS)} "
              f"run under torchrun with several processes", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        err_console.print("interrupted; a training run can be continued with --resume")
        return 130
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"kdet {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
