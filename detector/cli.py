"""The `detector` command: one verb per job, each with an example in its --help.

Verb modules are imported only when their verb runs, so `detector --help` and the torch-free
verbs (synth, score, eval, calibrate, manifest, info, serve, audit) start fast and never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Callable

from detector import __version__
from detector.serve_throttle import FAIL_LIMIT

Builder = Callable[[argparse.ArgumentParser], None]
# the `train` extra of pyproject.toml: what the training verbs import and a station does not install
TRAIN_PACKAGES = ("torch", "torchvision", "lightning", "albumentations", "onnx", "onnxscript", "tensorboard", "rich")
TRAIN_VERBS = ("demo", "train", "export")   # the verbs that need the training extras; a station install runs the rest


def _demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for the data, run, model and report")
    p.add_argument("--config", default=None, help="training config (default: configs/quick.yaml)")
    p.add_argument("--count", type=int, default=None,
                   help="synthetic training scans (default 160; the test scans are 3/8 of that, at least 20)")
    p.add_argument("--seed", type=int, default=0)


def _synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder (images/, masks/, manifest.csv)")
    p.add_argument("--count", type=int, required=True, help="number of scans")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anomaly-fraction", type=float, default=0.5, help="share of scans with an anomaly")
    p.add_argument("--workers", type=int, default=None, help="processes (default: the CPUs this process may use)")
    p.add_argument("--height", type=int, default=None,
                   help="scan height in px, 16-2000 (default: vehicle-dependent, 600-850)")
    p.add_argument("--split", default=None, help="write this value in the manifest's split column")


def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/default.yaml",
                   help="training config (default configs/default.yaml: the 44-minute quality run; configs/quick.yaml"
                        " trains in ~5 min; both ship with the package, so they resolve from any directory)")
    p.add_argument("--data", default=None,
                   help="dataset folder (manifest.csv or normal/ + anomalous/; default data/synth)")
    p.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    p.add_argument("--accelerator", default=None, help="auto, cpu, gpu (overrides the config)")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (RUN/last.ckpt)")
    p.add_argument("--init", default=None,
                   help="start from a trained checkpoint's network (e.g. the synthetic model's RUN/best.ckpt) and "
                        "fine-tune it on --data, with a fresh schedule (model.init)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. trainer.max_epochs=5")
    p.epilog = ("example:\n  detector train --config configs/quick.yaml --data data/synth --out runs/quick\n"
                "  detector train --data site/ --out runs/site --init runs/default/best.ckpt\n"
                "    (fine-tune the synthetic model on a site's own labelled scans)")


def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="RUN/best.ckpt")
    p.add_argument("--out", required=True, help="model.onnx")
    p.add_argument("--int8", action="store_true",
                   help="static INT8 (QDQ) quantization; the fp32 bundle is kept beside it as NAME.fp32.onnx")
    p.add_argument("--calibration", default=None,
                   help="labelled dataset folder for INT8 calibration and drift (required with --int8)")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="refuse INT8 if detection at 1%% false alarms or at the shipped threshold drops more "
                        "than this many points")
    p.add_argument("--opset", type=int, default=20)


def _pitch_option(p: argparse.ArgumentParser, rows: str = "") -> None:
    """--pitch-mm of the station verbs: the scanner's pitch for scan files that carry none; `rows`: what else sets
    it for a file (score: a manifest row's pitch_mm)."""
    p.add_argument("--pitch-mm", type=float, default=None,
                   help="pixel pitch in mm of scan files that carry none (many 16-bit PNG/TIFF); default: the "
                        f"bundle's (its training run's data.pitch_mm), else 5. A file's own pitch wins{rows}")


def _score(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="folder (recursive), glob, file list (.txt) or manifest.csv")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="results.csv")
    p.add_argument("--jsonl", default=None, help="also write results as JSON lines")
    p.add_argument("--coco", default=None,
                   help="also write the regions of every scored row as a COCO JSON, pre-annotations for a labelling "
                        "tool (CVAT, Label Studio); file names relative to SRC's folder")
    p.add_argument("--coco-images", default=None, metavar="DIR",
                   help="--coco: also draw each scan there as an 8-bit PNG a labelling tool shows (16-bit scans are "
                        "black or white there), at the file's pixel size, named like it (sub/a.tiff -> sub/a.png); "
                        "the COCO names them. detector manifest --images SCANS takes the original scans back")
    p.add_argument("--coco-min-score", type=float, default=None,
                   help="--coco: only the regions scoring at least this (default: every region in the results)")
    p.add_argument("--overlays", default=None, help="folder for overlay PNGs")
    p.add_argument("--overlays-flagged", action="store_true", help="overlays only for INSPECT")
    p.add_argument("--policy", default=None, help="routing policy YAML (tiers, risk flags); without it the "
                                                  "model's threshold routes and any risk flag forces INSPECT")
    p.add_argument("--threshold", type=float, default=None,
                   help="override the model's threshold (not with --policy: its tiers set the thresholds)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    _pitch_option(p, "; a manifest.csv row's pitch_mm, where set, wins for its file (a site with two scanners)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads")
    p.add_argument("--no-resume", action="store_true", help="rescore files already in --out")
    p.add_argument("--retry-failed", action="store_true",
                   help="resume, scoring again the files whose row in --out is a failure (their rows are replaced)")


def _eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results.csv from `detector score`")
    p.add_argument("--truth", required=True, help="dataset folder or manifest.csv with labels")
    p.add_argument("--out", required=True, help="folder for metrics.json, roc.png, report.html")
    p.add_argument("--baseline", default=None, metavar="OLD.csv",
                   help="results.csv of the model deployed now, on the same scans: adds a paired comparison (new - "
                        "baseline with 95%% intervals) to metrics.json, the report and the summary line")
    p.epilog = ("example:\n  detector eval results.csv --truth data/test --out report/\n"
                "  detector eval new.csv --truth data/test --out report/ --baseline old.csv\n"
                "    (is the new model better? both scored on the same labelled scans)")


def _calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results.csv of the site's cleared scans, from `detector score` with this --model; "
                                   "or the audit log of a station serving it (audit.sqlite, or its export)")
    p.add_argument("--model", required=True, help="the model.onnx bundle that scored them")
    p.add_argument("--out", required=True, help="the site's bundle to write (same graph, the site's thresholds)")
    p.add_argument("--truth", default=None,
                   help="dataset folder or manifest.csv: calibrate on the scans it labels normal only")
    p.add_argument("--since", default=None,
                   help="audit log: the verdicts at or after this ISO date/time only (UTC if no zone)")
    p.epilog = ("example:\n  detector score cleared/ --model model.onnx --out cleared.csv\n"
                "  detector calibrate cleared.csv --model model.onnx --out site.onnx\n"
                "  detector calibrate audit.sqlite --model model.onnx --out site.onnx --since 2026-11-01\n"
                "    (a station's own traffic: trucks whose inspection found something are left out)")


def _serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model.onnx bundle")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--audit", default="audit.sqlite", help="SQLite audit log of every verdict")
    p.add_argument("--policy", default=None, help="routing policy YAML (tiers, risk flags); "
                                                  "default: the model's calibrated threshold")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime threads per scan (default: the CPUs this process may use, within a "
                        "container's CPU quota, / concurrency)")
    _pitch_option(p)
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="larger uploads get 413")
    p.add_argument("--max-queue", type=int, default=8, help="waiting requests before 429")
    p.add_argument("--concurrency", type=int, default=1, help="scans inferred at once")
    p.add_argument("--deadline-ms", type=float, default=10000.0, help="per-request deadline; past it: INSPECT")
    p.add_argument("--auth-fail-limit", type=int, default=FAIL_LIMIT,
                   help="wrong tokens from one address within 60 s before it is locked out for 60 s (429); "
                        "0: none, for a service behind a reverse proxy that limits (every client has its address)")
    p.add_argument("--shadow", default=None, metavar="CANDIDATE.onnx",
                   help="a candidate model that scores the same trucks after each live answer, routing none; its "
                        "verdicts go to the audit log's shadow_verdicts table (compare: detector audit summary)")
    p.add_argument("--shadow-threads", type=int, default=1,
                   help="onnxruntime threads of the --shadow model (default 1: the live model keeps the cores)")
    p.add_argument("--tls-cert", default=None, metavar="CERT.pem",
                   help="serve https with this PEM certificate (chain, the service's first); needs --tls-key")
    p.add_argument("--tls-key", default=None, metavar="KEY.pem", help="the certificate's private key (PEM, no "
                                                                     "passphrase)")
    p.add_argument("--tls-client-ca", default=None, metavar="CA.pem",
                   help="mutual TLS: require a client certificate signed by this CA (a lane PC without one is refused "
                        "at the handshake)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn log level")
    p.epilog = ("env DETECTOR_TOKEN: when set, requests need 'Authorization: Bearer <token>'\n"
                "  (an empty DETECTOR_TOKEN is refused).\n"
                "example:\n  detector serve --model model.onnx --port 8080 --policy configs/policy.yaml\n"
                "  curl -F scan=@truck.tiff -F 'meta={\"tier\":\"standard\"}' http://127.0.0.1:8080/v1/inspect\n"
                "  detector serve --model live.onnx --shadow candidate.onnx   (candidate beside the live model)\n"
                "  detector serve --model model.onnx --host 0.0.0.0 --tls-cert station.pem --tls-key station.key "
                "--tls-client-ca lanes-ca.pem\n"
                "  curl --cacert site-ca.pem --cert lane1.pem --key lane1.key -F scan=@truck.tiff "
                "https://station:8080/v1/inspect")


def _audit(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["export", "summary"],
                   help="export: write the audit log as CSV, each verdict with its latest inspection outcome; "
                        "summary: verdicts, INSPECT share and the hit rate of inspection from the recorded outcomes")
    p.add_argument("--audit", default="audit.sqlite", help="audit database written by `detector serve`")
    p.add_argument("--since", default=None, help="ISO date/time, UTC if no zone, e.g. 2026-11-28T00:00")
    p.add_argument("--out", default=None, help="audit.csv (export; required there)")
    p.add_argument("--json", action="store_true", help="summary: print the figures as JSON")
    p.add_argument("--by", choices=["day", "week", "month"], default=None,
                   help="summary: also a row per UTC day, ISO week or month (per model), flagging a period whose "
                        "INSPECT share departs from the expected")
    p.epilog = ("example:\n  detector audit export --since 2026-11-01 --out audit.csv\n"
                "  detector audit summary --since 2026-11-01\n"
                "  detector audit summary --since 2026-09-01 --by week\n"
                "the outcomes come from the station: POST /v1/outcome to `detector serve` (see the README)")


def _manifest(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a labelling tool's export: a COCO JSON (CVAT, Label Studio, Roboflow), a folder of "
                               "Pascal VOC XML or LabelMe JSON, a YOLO folder (labels/ + images/, classes.txt or "
                               "data.yaml), or a CVAT for images 1.1 XML; or a station's audit log (audit.sqlite, or "
                               "its `detector audit export` CSV) with --images ARCHIVE")
    p.add_argument("--out", required=True, help="dataset folder to write (manifest.csv, masks/, left_out.csv)")
    p.add_argument("--images", default=None,
                   help="folder of the images the export names (default: beside the export, or its images/); "
                        "for an audit log, the scanner's archive (required)")
    p.add_argument("--format", default=None, choices=["coco", "voc", "labelme", "yolo", "cvat"],
                   help="the export's format (default: detected from its files)")
    p.add_argument("--split", default=None, help="write this value in the manifest's split column (train, val, test)")
    p.add_argument("--classes", default=None,
                   help="comma-separated categories that count as anomalies; shapes of the others are ignored "
                        "(an image with no other shape is then normal)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing DATASET/manifest.csv (and the masks its earlier run wrote)")
    p.add_argument("--append", action="store_true",
                   help="add the export's images to an existing DATASET/manifest.csv (a second batch of labels); "
                        "an image it already lists is left out, named with its row")
    p.add_argument("--since", default=None, help="audit log: only verdicts at or after this ISO date/time (UTC if naive)")
    p.add_argument("--until", default=None, help="audit log: only verdicts before this ISO date/time (UTC if naive)")
    p.epilog = ("example:\n  detector manifest export/annotations/instances_default.json --images export/images "
                "--out site/\n  detector manifest roboflow_export/ --out site/   (train/, valid/, test/: the split column)"
                "\n  detector train --config configs/quick.yaml --data site/ --out runs/mine\n"
                "images the export lists without shapes are normal (label 0), with shapes anomalous; images beside "
                "them\nthat it does not list are left out, and left_out.csv says which and why\n"
                "  detector manifest audit.sqlite --images /archive/scans --out verified/ --since 2026-11-01\n"
                "a station's audit log (or its `audit export` CSV): each truck with an inspection outcome, its scan "
                "found in\nthe archive by content (sha256), label 1 found, 0 clear; trucks without an outcome are "
                "left out")


def _info(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model bundle (.onnx) written by `detector export` or `detector calibrate`")
    p.add_argument("--json", action="store_true", help="print the metadata as stored (with the file's SHA-256)")


# verb -> (module with main(args) -> int, builder, one-line help, example)
VERBS: dict[str, tuple[str, Builder, str, str]] = {
    "demo": ("detector.demo", _demo, "synth -> train -> export -> score -> eval, small, on the CPU",
             "detector demo --out runs/demo"),
    "synth": ("detector.synth.dataset", _synth, "generate synthetic dual-energy truck scans",
              "detector synth data/synth --count 200 --seed 1 --anomaly-fraction 0.5"),
    "train": ("detector.train", _train, "train the anomaly network on labelled scans",
              "detector train --config configs/quick.yaml --data data/synth --out runs/quick"),
    "export": ("detector.export", _export, "export a checkpoint to one ONNX bundle",
               "detector export runs/quick/best.ckpt --out model.onnx"),
    "score": ("detector.score", _score, "score a folder of scans -> results CSV (+ overlays)",
              "detector score scans/ --model model.onnx --out results.csv --overlays overlays/"),
    "eval": ("detector.evaluate", _eval, "metrics, ROC and an HTML report from scored results",
             "detector eval results.csv --truth data/test --out report/"),
    "calibrate": ("detector.site_calibration", _calibrate, "re-threshold a model on a site's own cleared traffic",
                  "detector calibrate cleared.csv --model model.onnx --out site.onnx"),
    "manifest": ("detector.labels_to_dataset", _manifest, "a labelling tool's export (COCO, VOC, LabelMe, YOLO, "
                 "CVAT) or a station's audit log -> a dataset's manifest.csv", "detector manifest export/instances.json --out site/"),
    "info": ("detector.bundle_info", _info, "what a model bundle is: its training, validation and thresholds",
             "detector info model.onnx"),
    "serve": ("detector.serve", _serve, "HTTP inspection service for a scanning station",
              "detector serve --model model.onnx --port 8080"),
    "audit": ("detector.audit_report", _audit, "export or summarise the audit log of served decisions and their outcomes",
              "detector audit export --since 2026-11-01 --out audit.csv"),
}


def _top_help() -> str:
    lines = [f"detector {__version__}: anomaly detection in cargo X-ray scans", "",
             "usage: detector VERB [options]   (detector VERB --help for each)", "", "verbs:"]
    for verb, (_, _, text, example) in VERBS.items():
        lines.append(f"  {verb:<9} {text}")
        lines.append(f"            e.g. {example}")
    lines += ["", "Start here: detector demo"]
    return "\n".join(lines)


def build_parser(verb: str) -> argparse.ArgumentParser:
    """The argument parser of one verb (used by main and by tests)."""
    _, builder, text, example = VERBS[verb]
    p = argparse.ArgumentParser(prog=f"detector {verb}", description=text,
                                epilog=f"example:\n  {example}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    builder(p)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line as 'warning: message', without the source line Python prints under each
    (code, not advice); the category only where it is not a plain UserWarning."""
    kind = "" if issubclass(category, UserWarning) else f" ({category.__name__})"
    return f"warning{kind}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"detector: unknown verb {verb!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    # intermixed: `train ... trainer.max_epochs=2 --out RUN data.batch_size=8` takes both overrides (parse_args
    # takes a positional list once, and refused the second part as "unrecognized arguments")
    args = build_parser(verb).parse_intermixed_args(rest)
    try:
        return int(importlib.import_module(VERBS[verb][0]).main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `detector info --json | head`: the reader left; no traceback, and none at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ModuleNotFoundError as e:   # a station install (no extras) running a training verb
        if (e.name or "").split(".")[0] not in TRAIN_PACKAGES:
            raise
        core = [v for v in VERBS if v not in TRAIN_VERBS]
        print(f"detector {verb}: needs the training extras ({e.name} is not installed); a station install "
              f"runs {', '.join(core[:-1])} and {core[-1]}. Install them with: "
              f"pip install 'detector[train]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
