"""Torch-free station inference: scan -> preprocess -> ONNX -> score, regions, routing decision.

Only numpy, OpenCV, onnxruntime and core detector modules are imported, so a scanning station
installs no training stack. Preprocessing is `detector.preprocess.prepare`, the very function
training used. One Inspector serves concurrent calls: onnxruntime's `run` is thread-safe and all
per-call state is local. A process forked after an Inspector loaded (a preloading app server's workers) opens its own
session on first use: the inherited one is never run or destroyed there (_after_fork_in_child).
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import cv2
import numpy as np
import onnxruntime as ort

from detector.bundle import (HEIGHT_TOLERANCE, LOGITS_RULE, OUTPUT_RULE, BundleError, default_threshold,
                             height_range_mm, session_metadata, unloadable, untagged_pitch_mm, with_logits_output)
from detector.calibration import false_alarm_rate, score_digits
from detector.calibration import threshold_for_rate as _threshold_for_rate
from detector.cpus import usable_cpus   # also detector.runtime.usable_cpus, as before
from detector.preprocess import Preprocessing, prepare, valid_cells
from detector.scan import (Scan, ScanError, check_scan, default_pitch, file_shape, read_scan, read_scan_bytes,
                           scan_from_counts)

Source = Union[str, os.PathLike, Scan, tuple, bytes, np.ndarray]
EPS = 1e-6
OUT_TOL = 1e-3  # model outputs may stray this far outside [0, 1] (quantisation)
_LIVE: weakref.WeakSet = weakref.WeakSet()   # this process's Inspectors, for _after_fork_in_child


class InspectionError(RuntimeError):
    """Inference itself failed (model run, deadline), or the model may not judge this scan (its height). One about a
    file has `.path` and `.reason`, and `str()` "<path>: <reason>" as a ScanError's, so a batch row that names the
    file already can give the reason alone."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message if path is None else f"{path}: {message}")
        self.path, self.reason = path, message


@dataclass(frozen=True)
class Region:
    """A suspicious area: box (x0, y0, x1, y1) in scan pixels (the file's, where its reader squared them) and its peak
    heatmap probability."""

    box: tuple[int, int, int, int]
    score: float

    def to_dict(self) -> dict:
        return {"box": [int(v) for v in self.box], "score": round(float(self.score), 4)}


@dataclass
class Verdict:
    """The routing answer for one scan; `reason` says why in words an officer can read."""

    score: float
    decision: str
    threshold: float
    regions: list[Region] = field(default_factory=list)
    reason: str = ""
    heatmap: np.ndarray | None = None
    heatmap_scale_yx: tuple[float, float] = (1.0, 1.0)
    timings_ms: dict[str, float] = field(default_factory=dict)
    latency_ms: float = 0.0
    source: str | None = None
    model_sha256: str | None = None
    error: str | None = None
    untagged_pitch_mm: float | None = None   # the pitch a file that carries none was read at; None: it had its own
    score_rule: str | None = None   # how the score was made (bundle.LOGITS_RULE or OUTPUT_RULE); None: no score

    def to_dict(self) -> dict:
        """JSON-safe summary without the heatmap (NaN score of a failure -> None)."""
        score = None if self.score is None or not math.isfinite(self.score) else round(float(self.score), 6)
        return {"score": score, "decision": self.decision, "threshold": float(self.threshold),
                "regions": [r.to_dict() for r in self.regions], "reason": self.reason,
                "heatmap_scale_yx": [float(v) for v in self.heatmap_scale_yx],
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
                "latency_ms": round(self.latency_ms, 3), "source": self.source,
                "model_sha256": self.model_sha256, "error": self.error}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def topk_mean_score(logits: np.ndarray, k: int) -> float:
    """sigmoid(mean of the k largest logits): the score rule the network uses, on its heatmap's logits."""
    flat = logits.reshape(-1).astype(np.float64)
    k = max(1, min(int(k), flat.size))
    top = np.partition(flat, flat.size - k)[flat.size - k:]
    return float(1.0 / (1.0 + math.exp(-float(top.mean()))))


def topk_mean_logit_score(heatmap: np.ndarray, k: int) -> float:
    """The score rule on a heatmap's probabilities (their logits recovered), where the graph's logits are unknown."""
    return topk_mean_score(_logit(heatmap), k)


def _top(heatmap: np.ndarray, k: int) -> np.ndarray:
    flat = heatmap.reshape(-1)
    return np.sort(np.partition(flat, flat.size - k)[flat.size - k:])


def own_cells_score(heatmap: np.ndarray, own: np.ndarray, score: float | None, k: int,
                    own_logits: np.ndarray | None = None) -> float:
    """The score over the scan's own cells `own` (the heatmap less the cells wholly over the padding), as training's
    validation, which set the thresholds, pools them. Pooled from `own_logits` (the graph's heatmap logits of those
    cells) where the graph exposes them: so a scan scores the same whole or in tiles, and an INT8 graph's score is
    not held to its quantized score output's 1/255 steps. Without them: `score` (the graph's, over every cell; None
    for a tiled scan) where the padding does not change the top k (a model may fire at a scan's cut edge), else
    pooled from `own`'s probabilities (an INT8 heatmap's 1/255 steps are too coarse to recover logits from)."""
    k = max(1, min(int(k), own.size))
    if own_logits is not None:
        return topk_mean_score(own_logits, k)
    if score is not None and (own.shape == heatmap.shape or np.array_equal(_top(heatmap, k), _top(own, k))):
        return score
    return topk_mean_logit_score(own, k)


def _session_options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads) if threads else usable_cpus()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


class Inspector:
    """Loads one bundle, validates it, and turns scans into Verdicts (see DESIGN.md "Routing")."""

    def __init__(self, model_path: str | os.PathLike, threads: int | None = None,
                 threshold: float | None = None, *, max_width: int = 2048, tile_overlap: int = 256,
                 region_threshold: float = 0.5, max_regions: int = 10, warmup: bool = True,
                 default_pitch_mm: float | None = None):
        """`default_pitch_mm`: the pitch of a scan file (or counts array) that carries none; None: the bundle's
        (its training run's data.pitch_mm), else 5 mm. A file's own pitch wins."""
        self.path = Path(model_path)
        self._file, self.threads, self._lock = Path(os.path.abspath(self.path)), threads, threading.Lock()
        self._closed = False
        _check_options(threads, region_threshold, max_regions)
        asked_pitch = valid_default_pitch(default_pitch_mm)
        if self.path.is_dir():
            raise BundleError(self.path, "a folder, not a model file: pass the .onnx bundle that `detector export` "
                                         "wrote")
        if self.path.exists() and not self.path.is_file():   # a FIFO waits forever, /dev/zero fills memory
            raise BundleError(self.path, "not a regular file (a device or a pipe): pass the .onnx bundle file")
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise BundleError(self.path, f"cannot read model file ({e.strerror or e})") from None
        self.model_sha256 = hashlib.sha256(data).hexdigest()
        self.session, self.logits_name = _load_session(data, threads, self.path)
        self.score_rule = LOGITS_RULE if self.logits_name else OUTPUT_RULE   # recorded with each score (calibrate)
        _LIVE.add(self)
        self.metadata = session_metadata(self.session, data, self.path)
        self.channels = int(self.metadata["channels"])
        self.stride = int(self.metadata["stride"])
        self.score_k = int(self.metadata["score"]["k"])
        self.pre = Preprocessing.from_dict(self.metadata["preprocessing"])
        self.default_threshold, self.default_rate = default_threshold(self.metadata)
        self.threshold = valid_threshold(threshold) if threshold is not None else self.default_threshold
        self.region_threshold = float(region_threshold)
        self.max_regions = int(max_regions)
        self.height_range_mm = height_range_mm(self.metadata)   # None: the bundle does not say (checked nowhere)
        self.default_pitch_mm = untagged_pitch_mm(self.metadata) if asked_pitch is None else asked_pitch
        self._check_pad_multiple()
        # tile widths/starts are multiples of m so the pixel and heatmap grids stay aligned
        m = self.pre.pad_multiple * self.stride // math.gcd(self.pre.pad_multiple, self.stride)
        self.tile_overlap = max(2 * m, int(math.ceil(tile_overlap / (2 * m))) * 2 * m)
        self.max_width = max(2 * self.tile_overlap, int(max_width) // m * m)
        if warmup:  # a typical 640x2400 px scan at 5 mm: the first real call then runs at full speed
            h, w = (-(-v // m) * m for v in (320, min(1216, self.max_width)))
            try:
                self._run(np.zeros((self.channels, h, w), np.float32), None)
            except InspectionError as e:
                raise BundleError(self.path, f"warm-up run: {e}") from None

    # ------------------------------------------------------------ public API

    def threshold_for_rate(self, rate: float) -> float:
        """Threshold for a target false-alarm rate, from the bundle's normal validation scores."""
        scores = self.metadata.get("normal_scores") or []
        if not scores:
            raise BundleError(self.path, "bundle has no normal_scores to derive thresholds from")
        return float(_threshold_for_rate(scores, rate))

    def inspect(self, src: Source, threshold: float | None = None) -> Verdict:
        """Inspect one scan; raises ScanError (bad input) or InspectionError (inference failed)."""
        return self._inspect(src, threshold, deadline=None)

    def inspect_safe(self, src: Source, deadline_ms: float | None = None,
                     threshold: float | None = None, *, on_scan: Callable[[Scan], Any] | None = None) -> Verdict:
        """Fail-closed inspect: any error or a deadline overrun gives INSPECT with the reason; never raises.
        `on_scan`: called with the Scan once read (serve's shadow model scores that very scan; nothing read twice)."""
        t0 = time.perf_counter()
        try:
            return self._inspect(src, threshold, deadline=_deadline(t0, deadline_ms), t0=t0, on_scan=on_scan)
        except Exception as e:  # fail closed: the truck goes to manual inspection
            reason = str(e) if isinstance(e, (ScanError, BundleError, InspectionError)) else f"{type(e).__name__}: {e}"
            try:
                thr = self.threshold if threshold is None else valid_threshold(threshold)
            except InspectionError:
                thr = self.threshold
            return Verdict(score=float("nan"), decision="INSPECT", threshold=thr,
                           reason=f"fail-closed: {reason}", error=reason,
                           latency_ms=(time.perf_counter() - t0) * 1000.0,
                           source=_source_name(src), model_sha256=self.model_sha256)

    def close(self) -> None:
        """Release the model (its onnxruntime session: memory and threads) now, not when the last reference to this
        Inspector goes; later calls raise InspectionError (inspect_safe: INSPECT). Closing twice is harmless."""
        with self._lock:
            self._closed, self.session = True, None

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ processes

    def _session(self) -> ort.InferenceSession:
        """The onnxruntime session of this process: opened again from the bundle file in a process forked from the
        one that loaded it (see _after_fork_in_child)."""
        session = self.session
        if session is None:
            with self._lock:
                if self._closed:
                    raise InspectionError("this Inspector was closed (close() or the end of its with block)",
                                          str(self.path))
                if self.session is None:
                    self.session = self._reopen()
                session = self.session
        return session

    def _reopen(self) -> ort.InferenceSession:
        """A session of the bundle file for this process; InspectionError (what inspect raises when inference cannot
        run) where the file cannot be read or no longer holds the model this Inspector loaded (a new bundle dropped
        in its place: its thresholds are not that model's)."""
        try:
            data = self._file.read_bytes()
        except OSError as e:
            raise InspectionError(f"cannot read the model file again in process {os.getpid()} ({e.strerror or e})",
                                  str(self.path)) from None
        if hashlib.sha256(data).hexdigest() != self.model_sha256:
            raise InspectionError(f"the model file changed since this Inspector loaded it (sha256 "
                                  f"{self.model_sha256[:12]}), so process {os.getpid()} cannot open the same model: "
                                  "create the Inspector again", str(self.path))
        try:
            return _load_session(data, self.threads, self.path)[0]
        except BundleError as e:
            raise InspectionError(e.reason, str(self.path)) from None

    def __getstate__(self) -> dict:
        """Pickled (multiprocessing's spawn) without the session: the copy opens its own from the file (_reopen)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("session", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, session=None, _lock=threading.Lock())
        _LIVE.add(self)

    def _forked(self) -> None:
        """In a forked child: abandon the parent's session (kept, never destroyed: destroying it joins threads that
        only the parent has, and waited forever) and open this process's own on first use."""
        if self.session is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(self.session))
        self.session, self._lock = None, threading.Lock()   # a lock a parent thread held at the fork stays held

    # ------------------------------------------------------------ stages

    def _read(self, src: Source) -> Scan:
        if isinstance(src, Scan):
            return check_scan(src)
        pitch = self.default_pitch_mm   # for a file that carries none; a Scan has its own
        if isinstance(src, (str, os.PathLike)):
            return read_scan(src, default_pitch_mm=pitch)
        if _named_bytes(src):
            return read_scan_bytes(bytes(src[0]), str(src[1]), default_pitch_mm=pitch)
        if isinstance(src, (bytes, bytearray)):
            return read_scan_bytes(bytes(src), "<bytes>", default_pitch_mm=pitch)
        if isinstance(src, np.ndarray):
            scan = scan_from_counts(src, pitch_mm=pitch)
            scan.pitch_default = True   # counts carry no pitch
            return scan
        raise ScanError(repr(src)[:60], "expected a path, a Scan, (bytes, name) or a counts array")

    def _inspect(self, src: Source, threshold: float | None, deadline: float | None,
                 t0: float | None = None, on_scan: Callable[[Scan], Any] | None = None) -> Verdict:
        t0 = time.perf_counter() if t0 is None else t0
        timings: dict[str, float] = {}
        scan = self._read(src)
        if on_scan is not None:
            on_scan(scan)
        t1 = time.perf_counter()
        timings["read"] = (t1 - t0) * 1000.0
        _check_deadline(deadline, t0, "read")
        self._check_height(scan)
        prepared = prepare(scan, self.pre, self.channels)
        t2 = time.perf_counter()
        timings["preprocess"] = (t2 - t1) * 1000.0
        _check_deadline(deadline, t0, "preprocess")
        heatmap, score, logits = self._infer(prepared.x, deadline, t0)
        t3 = time.perf_counter()
        timings["infer"] = (t3 - t2) * 1000.0
        _check_deadline(deadline, t0, "inference")
        hv, wv = valid_cells(*prepared.valid_hw, self.stride)
        own = np.ascontiguousarray(heatmap[:hv, :wv])
        own_logits = None if logits is None else logits[:hv, :wv]
        score, heatmap = own_cells_score(heatmap, own, score, self.score_k, own_logits), own
        fh, fw = file_shape(scan)   # regions in the file's pixels, where its reader squared them
        cell_yx = _file_cells(self.stride * prepared.scale_yx[0], self.stride * prepared.scale_yx[1], scan, fh, fw)
        thr = self.threshold if threshold is None else valid_threshold(threshold)
        # a threshold under the region cut-off would send trucks to inspection with nothing to look at; the hottest
        # cell is at least the score (a top-k mean), so an INSPECT always has its region
        regions = self._regions(heatmap, cell_yx, fh, fw, min(self.region_threshold, thr))
        decision = "INSPECT" if score >= thr else "RELEASE"
        d = score_digits(score, thr)
        reason = (f"score {score:.{d}f} {'>=' if decision == 'INSPECT' else '<'} threshold {thr:.{d}f} "
                  f"({self._rate_text(thr)})")
        t4 = time.perf_counter()
        timings["postprocess"] = (t4 - t3) * 1000.0
        _check_deadline(deadline, t0, "postprocess")
        return Verdict(score=score, decision=decision, threshold=thr, regions=regions, reason=reason,
                       heatmap=heatmap, heatmap_scale_yx=cell_yx, timings_ms=timings,
                       latency_ms=(t4 - t0) * 1000.0, source=scan.source, model_sha256=self.model_sha256,
                       untagged_pitch_mm=scan.pitch_mm if scan.pitch_default else None, score_rule=self.score_rule)

    def _check_pad_multiple(self) -> None:
        """BundleError unless the graph runs on an input padded to the bundle's pad_multiple alone (odd multiples of
        it): a hand-edited pad_multiple the network's strides cannot take (8 where it needs 32) loaded, passed the
        warm-up (a multiple of 32) and then failed closed on most trucks with an onnxruntime message."""
        p = self.pre.pad_multiple
        h, w = (p * (n + 1 - n % 2) for n in (-(-96 // p), -(-160 // p)))
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4   # the failure is the BundleError's to tell, not an onnxruntime log line
        try:
            self._session().run(["heatmap"], {"scan": np.zeros((1, self.channels, h, w), np.float32)}, quiet)
        except Exception as e:
            raise BundleError(self.path, f"preprocessing pad_multiple {p} does not suit this graph: an input padded "
                                         f"to it ({h} x {w} model px) fails to run ({str(e).splitlines()[0][:160]}); "
                                         "was the metadata edited? Restore the exported pad_multiple or re-export"
                              ) from None

    def _check_height(self, scan: Scan) -> None:
        """InspectionError for a scan far taller or shorter than the training scans: its pixel pitch is likely
        wrong, and resampled at it the cargo shrinks (or swells) out of what the model can see."""
        if self.height_range_mm is None:
            return
        lo, hi = self.height_range_mm
        mm = scan.height * scan.pitch_mm
        if not lo <= mm <= hi:
            raise InspectionError(f"{scan.height} px at {scan.pitch_mm:g} mm per pixel is {mm / 1000:.2f} m high, "
                                  f"outside the {lo / 1000:.2f}-{hi / 1000:.2f} m this model accepts (its training "
                                  f"scans' heights, widened {HEIGHT_TOLERANCE:g}x): is the scan's pixel pitch right?",
                                  scan.source)

    def _rate_text(self, thr: float) -> str:
        if abs(thr - self.default_threshold) < 1e-12:
            return f"{self.default_rate * 100:g}% false-alarm rate"
        scores = self.metadata.get("normal_scores") or []
        if scores:
            return f"custom threshold: {false_alarm_rate(scores, thr) * 100:.3g}% false alarms on validation"
        return "custom threshold"

    def _run(self, x: np.ndarray, run_options: ort.RunOptions | None
             ) -> tuple[np.ndarray, float, np.ndarray | None]:
        """heatmap (H/s, W/s), score, and the heatmap's logits where the graph exposes them (else None)."""
        names = ["heatmap", "score"] + ([self.logits_name] if self.logits_name else [])
        try:
            heatmap, score, *logits = self._session().run(names, {"scan": x[None]}, run_options)
        except Exception as e:
            if run_options is not None and run_options.terminate:
                raise InspectionError("deadline exceeded during inference (run terminated)") from None
            raise InspectionError(f"model run failed on input {tuple(x.shape)}: {str(e).splitlines()[0][:200]}") from None
        self._check_outputs(heatmap, score, x.shape)
        if logits and (logits[0].shape != heatmap.shape or not np.isfinite(logits[0]).all()):
            raise InspectionError(f"the heatmap's logits ({self.logits_name}) are not finite or not shaped as the "
                                  f"heatmap ({logits[0].shape} vs {heatmap.shape})")
        return heatmap[0, 0], min(max(float(score[0]), 0.0), 1.0), logits[0][0, 0] if logits else None

    def _check_outputs(self, heatmap: np.ndarray, score: np.ndarray, x_shape: tuple) -> None:
        """The bundle contract: heatmap (1, 1, H/stride, W/stride) and score (1,), finite, in [0, 1]. Another
        stride than the metadata's put regions in the wrong place; logits instead of probabilities routed on
        the wrong scale (a logit of 0.3 is RELEASE at threshold 0.4, yet its probability is 0.57)."""
        want = (1, 1, x_shape[-2] // self.stride, x_shape[-1] // self.stride)
        if heatmap.shape != want or score.shape != (1,):
            raise InspectionError(f"model outputs heatmap {heatmap.shape} and score {score.shape} for input "
                                  f"{(1, *x_shape)}; the bundle (stride {self.stride}) needs {want} and (1,)")
        if not (np.isfinite(score).all() and np.isfinite(heatmap).all()):
            raise InspectionError("model produced a non-finite output")
        lo, hi = min(float(heatmap.min()), float(score[0])), max(float(heatmap.max()), float(score[0]))
        if lo < -OUT_TOL or hi > 1.0 + OUT_TOL:   # the tolerance: an INT8 sigmoid dequantises a hair past 1
            raise InspectionError(f"model outputs values in [{lo:.3g}, {hi:.3g}], not probabilities in [0, 1]")

    def _infer(self, x: np.ndarray, deadline: float | None, t0: float
               ) -> tuple[np.ndarray, float | None, np.ndarray | None]:
        """Whole scan in one run (heatmap, the graph's score, logits), or width tiles with overlap stitched by max
        (bounded memory; score None: the caller pools the stitched logits, or probabilities where there are none)."""
        opts, timer = None, None
        if deadline is not None:
            opts = ort.RunOptions()
            timer = threading.Timer(max(0.0, deadline - time.perf_counter()), _terminate, (opts,))
            timer.daemon = True
            timer.start()
        try:
            width = x.shape[-1]
            if width <= self.max_width:
                return self._run(x, opts)
            s, tw, half = self.stride, self.max_width, self.tile_overlap // 2
            step = tw - self.tile_overlap
            starts = list(range(0, width - tw, step)) + [width - tw]
            stitched = np.zeros((x.shape[-2] // s, width // s), np.float32)
            logits = np.full_like(stitched, -np.inf) if self.logits_name else None
            for i, a in enumerate(starts):
                _check_deadline(deadline, t0, f"{i} of {len(starts)} tiles")
                hm, _, lg = self._run(np.ascontiguousarray(x[:, :, a:a + tw]), opts)
                lo = 0 if i == 0 else half                  # trust tile centres: borders lack context
                hi = tw if i == len(starts) - 1 else tw - half
                for whole, tile in ((stitched, hm), (logits, lg)):
                    if whole is not None:
                        np.maximum(whole[:, (a + lo) // s:(a + hi) // s], tile[:, lo // s:hi // s],
                                   out=whole[:, (a + lo) // s:(a + hi) // s])
            return stitched, None, logits
        finally:
            if timer is not None:
                timer.cancel()

    def _regions(self, heatmap: np.ndarray, cell_yx: tuple[float, float], h: int, w: int,
                 cut: float) -> list[Region]:
        """The heatmap's regions at or above `cut`, at most max_regions (heatmap_regions)."""
        return heatmap_regions(heatmap, cell_yx, h, w, cut, self.max_regions)


def heatmap_regions(heatmap: np.ndarray, cell_yx: tuple[float, float], h: int, w: int, cut: float,
                    max_regions: int) -> list[Region]:
    """Connected components at or above `cut` -> boxes in the file's pixels (h x w, cells of cell_yx), best first:
    the station's regions, also drawn by a training run's review (detector.run_review)."""
    mask = (heatmap >= cut).astype(np.uint8)
    if not mask.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    out = []
    for i in range(1, n):
        x, y, bw, bh = (int(v) for v in stats[i, :4])
        peak = float(heatmap[labels == i].max())
        box = (int(x * cell_yx[1]), int(y * cell_yx[0]),
               min(w, int(math.ceil((x + bw) * cell_yx[1]))), min(h, int(math.ceil((y + bh) * cell_yx[0]))))
        out.append(Region(box=box, score=peak))
    out.sort(key=lambda r: -r.score)
    return out[:max_regions]


def _after_fork_in_child() -> None:
    """os.fork() copies a process but only its calling thread: an onnxruntime session inherited from the parent has
    lost its thread pool, and a preloaded app server's worker hung on dropping it (a reload) or at its normal exit,
    and ran its inference on one thread. Each Inspector opens its own session in the child instead."""
    for inspector in list(_LIVE):
        inspector._forked()


if hasattr(os, "register_at_fork"):   # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _file_cells(cell_y: float, cell_x: float, scan: Scan, fh: int, fw: int) -> tuple[float, float]:
    """A heatmap cell's size in the pixels of the file of fh x fw the scan was read from: the squared grid's scaled
    per axis where its reader squared a line scanner's pixels (a station draws the regions on the file it sent;
    in the squared grid they were 20 % off along the finer axis of 4 x 5 mm pixels), the same numbers where not."""
    if (fh, fw) == (scan.height, scan.width):
        return cell_y, cell_x
    return cell_y * fh / scan.height, cell_x * fw / scan.width


def _load_session(data: bytes, threads: int | None, path: Path) -> tuple[ort.InferenceSession, str | None]:
    """The bundle's onnxruntime session, with its heatmap's logits as one more output where they can be found (the
    name, else None), so the runtime pools tiles and padded scans as the graph does (bundle.with_logits_output)."""
    model, logits = with_logits_output(data)
    for candidate, name in ((model, logits), (data, None)) if logits else ((data, None),):
        try:
            return ort.InferenceSession(candidate, _session_options(threads), providers=["CPUExecutionProvider"]), name
        except Exception as e:
            error = e
    raise unloadable(path, error) from None


def _check_options(threads: Any, region_threshold: Any, max_regions: Any) -> None:
    """InspectionError for Inspector options that would quietly misroute: max_regions=-1 dropped the best region
    (a slice), a NaN region cut-off gave no region at all, threads=-2 was handed to onnxruntime."""
    if threads is not None and not (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        raise InspectionError(f"threads must be a whole number >= 1 (or None: the usable cores), got {threads!r}")
    if not (isinstance(max_regions, int) and not isinstance(max_regions, bool) and max_regions >= 0):
        raise InspectionError(f"max_regions must be a whole number >= 0, got {max_regions!r}")
    try:
        valid_threshold(region_threshold)
    except InspectionError:
        raise InspectionError(f"region_threshold must be a number in [0, 1] (a heatmap probability), got "
                              f"{region_threshold!r}") from None


def valid_default_pitch(pitch_mm: Any) -> float | None:
    """None, or a pitch for scan files that carry none (scan.default_pitch's range); InspectionError in one line for
    anything else, at start-up, where it would otherwise fail (or misread) every untagged truck."""
    if pitch_mm is None:
        return None
    try:
        return default_pitch(pitch_mm)
    except ScanError as e:
        raise InspectionError(e.reason) from None


def valid_threshold(t: Any) -> float:
    """Scores lie in [0, 1]: a threshold above 1 (or NaN: score >= NaN is False) would RELEASE every truck, one
    below 0 INSPECT every one; True read as 1.0 and released every truck too. Refuse them, and anything else that
    is not a number (text, as deadline_ms refuses it)."""
    number = not isinstance(t, (bool, np.bool_, str, bytes))
    try:
        value = float(t) if number else math.nan
    except (TypeError, ValueError):
        value, number = math.nan, False
    if not 0.0 <= value <= 1.0:
        raise InspectionError(f"threshold must be a number in [0, 1] (scores lie in [0, 1]), got "
                              f"{value if number else repr(t)}")
    return value


def _deadline(t0: float, deadline_ms: Any) -> float | None:
    """perf_counter time by which a call must end; None: no deadline (None, +inf, or one past threading.TIMEOUT_MAX,
    ~292 years, which the inference timer cannot wait: its thread died with an OverflowError). A NaN deadline (which
    never compared as passed yet fired the inference timer at once) or a non-number is an InspectionError."""
    if deadline_ms is None:
        return None
    try:
        ms = float(deadline_ms)
    except (TypeError, ValueError):
        ms = float("nan")
    if math.isnan(ms) or isinstance(deadline_ms, (bool, str, bytes)):
        raise InspectionError(f"deadline_ms must be a number of milliseconds, got {deadline_ms!r}")
    return None if ms / 1000.0 >= threading.TIMEOUT_MAX else t0 + ms / 1000.0


def _terminate(opts: ort.RunOptions) -> None:
    opts.terminate = True


def _check_deadline(deadline: float | None, t0: float, stage: str) -> None:
    if deadline is not None:
        now = time.perf_counter()
        if now > deadline:
            raise InspectionError(f"deadline exceeded after {stage} ({(now - t0) * 1000:.1f} ms > "
                                  f"{(deadline - t0) * 1000:.1f} ms)")


def _source_name(src: Any) -> str | None:
    if isinstance(src, Scan):
        return src.source
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if _named_bytes(src):   # not any pair: (name, data) made the whole file's repr the verdict's source
        return str(src[1])
    return None


def _named_bytes(src: Any) -> bool:
    """Whether `src` is the (file bytes, name) pair inspect takes."""
    return isinstance(src, tuple) and len(src) == 2 and isinstance(src[0], (bytes, bytearray, memoryview))
