"""Shared fixtures: small scans and a torch-free heuristic model bundle built with onnx.helper.

The heuristic bundle honours the bundle contract (input `scan`, outputs `heatmap` and `score`,
metadata under "detector") so core tests (runtime, score, serve) never need torch or training.
Its heatmap is sigmoid(a * (mean attenuation over 8x8 model pixels - b)): dense objects light up,
light cargo does not.
"""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

I0 = 53000.0
STRIDE = 8
DENSE_ATT = 2.5     # attenuation (high+low mean) at which the heuristic heatmap crosses 0.5
SLOPE = 4.0         # heatmap logit per unit of attenuation
# synthetic validation scores of normal scans: the 1 % threshold lands near 0.4
NORMAL_SCORES = np.linspace(0.01, 0.40, 300).round(6).tolist()
TRAINING_PACKAGES = ("torch", "torchvision", "lightning", "pytorch_lightning", "albumentations")


def run_without(code: str, blocked: tuple[str, ...] = TRAINING_PACKAGES, timeout: float = 120
                ) -> subprocess.CompletedProcess:
    """Run Python `code` in a fresh interpreter where the `blocked` packages cannot be imported, as on a station
    that installed the core alone; stdout and stderr are captured as text."""
    prelude = f"import sys\nfor m in {blocked!r}:\n    sys.modules[m] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout)


def make_heuristic_bundle(path: str | Path, channels: int = 2, normal_scores=None,
                          default_rate: float = 0.01) -> Path:
    """Write a contract-valid .onnx bundle whose score is high for dense regions (no torch)."""
    import onnx
    from onnx import TensorProto, helper

    from detector.bundle import attach_metadata, make_metadata
    from detector.calibration import threshold_table
    from detector.preprocess import Preprocessing

    pre = Preprocessing()
    a = SLOPE * pre.scale              # logit per unit of normalised input
    b = DENSE_ATT / pre.scale          # normalised input at logit 0
    nodes = [
        helper.make_node("ReduceMean", ["scan", "ax1"], ["mean"], keepdims=1),
        helper.make_node("AveragePool", ["mean"], ["pooled"], kernel_shape=[STRIDE, STRIDE],
                         strides=[STRIDE, STRIDE]),
        helper.make_node("Sub", ["pooled", "b"], ["centred"]),
        helper.make_node("Mul", ["centred", "a"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["heatmap"]),
        helper.make_node("ReduceMax", ["heatmap", "ax123"], ["score"], keepdims=0),
    ]
    inits = [
        helper.make_tensor("ax1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("ax123", TensorProto.INT64, [3], [1, 2, 3]),
        helper.make_tensor("a", TensorProto.FLOAT, [], [a]),
        helper.make_tensor("b", TensorProto.FLOAT, [], [b]),
    ]
    graph = helper.make_graph(
        nodes, "heuristic_dense",
        [helper.make_tensor_value_info("scan", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", 1, "Hs", "Ws"]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="detector-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    scores = NORMAL_SCORES if normal_scores is None else sorted(float(s) for s in normal_scores)
    meta = make_metadata(
        channels=channels, energies=["high", "low"][:channels] if channels == 2 else ["single"],
        pitch_mm=pre.model_pitch_mm, preprocessing=pre.to_dict(), stride=STRIDE,
        score={"method": "topk_mean_logit", "k": 1},  # top-1 mean logit == max of the heatmap
        thresholds=threshold_table(scores, (default_rate, 0.005, 0.001)),
        default_false_alarm_rate=default_rate, normal_scores=scores,
        validation={"note": "heuristic test model, not trained"},
        train_config={"model": "heuristic_dense", "a": a, "b": b}, data_fingerprint="none")
    attach_metadata(model, meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_scan_counts(height: int = 200, width: int = 600, channels: int = 2, dense: bool = False,
                     seed: int = 0) -> np.ndarray:
    """uint16 counts (C, H, W): air on top, light cargo, a chassis strip; optionally a dense block."""
    rng = np.random.default_rng(seed)
    att = np.zeros((height, width), np.float32)
    top = height // 4
    att[top:, width // 20: width - width // 20] = 0.6                      # light cargo
    att[top:, width // 20: width - width // 20] += rng.normal(0, 0.05, (height - top, width - 2 * (width // 20)))
    att[height - height // 10:, :] = 1.2                                     # chassis
    if dense:
        y0, x0 = height // 2 - 30, width // 2 - 40
        att[y0:y0 + 60, x0:x0 + 80] = 4.6                                   # ~1 % transmission
    att = np.clip(att, 0, None)
    ratios = (1.0, 1.3)[:channels] if channels == 2 else (1.0,)
    counts = np.stack([I0 * np.exp(-att * r) for r in ratios])
    counts = rng.poisson(counts).clip(0, 65535).astype(np.uint16)
    return counts


def write_test_scan(path: str | Path, **kw) -> Path:
    from detector.scan import write_scan

    c = kw.get("channels", 2)
    return write_scan(path, make_scan_counts(**kw), i0=(I0,) * c,
                      pitch_mm=5.0, energies=("high", "low") if c == 2 else ("single",))


def write_nonsquare_scan(path: str | Path, row_mm: float = 4.0, col_mm: float = 5.0,
                         box: tuple[int, int, int, int] = (400, 110, 480, 160), height: int = 200, width: int = 600,
                         seed: int = 5) -> Path:
    """A line scanner's dual-energy TIFF of non-square pixels (row_mm down the rows, col_mm across the columns, in
    its resolution tags) whose dense block (~1 % transmission) covers `box` [x0, y0, x1, y1] in the FILE's pixels."""
    import tifffile
    counts = make_scan_counts(height, width, 2, seed=seed)
    x0, y0, x1, y1 = box
    for c, ratio in enumerate((1.0, 1.3)):
        counts[c, y0:y1, x0:x1] = round(I0 * np.exp(-4.6 * ratio))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tw:
        for page in counts:   # XResolution counts pixels across the columns, YResolution down the rows
            tw.write(page, photometric="minisblack", resolution=(10 / col_mm, 10 / row_mm),
                     resolutionunit="CENTIMETER")
    return path


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """A fake cgroup tree: `cgroup(proc_line, {relative file: text})` writes /proc/self/cgroup's text and the
    group files under a fake /sys/fs/cgroup, and points detector.cpus at them (its cached quota forgotten)."""
    from detector import cpus
    root, proc = tmp_path / "sys_fs_cgroup", tmp_path / "proc_self_cgroup"
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_CGROUP", proc)

    def make(proc_text: str, files: dict[str, str]) -> None:
        root.mkdir(exist_ok=True)
        proc.write_text(proc_text)
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        cpus.cpu_quota.cache_clear()
    make("", {})
    yield make
    cpus.cpu_quota.cache_clear()


@pytest.fixture(scope="session")
def heuristic_model(tmp_path_factory) -> Path:
    """A valid 2-channel contract bundle (.onnx) built without torch."""
    return make_heuristic_bundle(tmp_path_factory.mktemp("bundle") / "heuristic.onnx")


@pytest.fixture(scope="session")
def heuristic_model_1ch(tmp_path_factory) -> Path:
    """The same heuristic bundle for single-energy scans."""
    return make_heuristic_bundle(tmp_path_factory.mktemp("bundle1") / "heuristic_1ch.onnx", channels=1)


@pytest.fixture(scope="session")
def scan_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scans")


@pytest.fixture(scope="session")
def normal_scan_path(scan_dir) -> Path:
    """200x600 px dual-energy uint16 TIFF: air on top, light cargo (expected RELEASE)."""
    return write_test_scan(scan_dir / "normal.tiff", seed=1)


@pytest.fixture(scope="session")
def anomalous_scan_path(scan_dir) -> Path:
    """Like normal_scan_path with a dense 60x80 px block in the cargo (expected INSPECT)."""
    return write_test_scan(scan_dir / "anomalous.tiff", dense=True, seed=2)


@pytest.fixture(scope="session")
def normal_scan_1ch_path(scan_dir) -> Path:
    """Single-energy variant of normal_scan_path."""
    return write_test_scan(scan_dir / "normal_1ch.tiff", channels=1, seed=3)


@pytest.fixture(scope="session")
def anomalous_scan_1ch_path(scan_dir) -> Path:
    """Single-energy variant of anomalous_scan_path."""
    return write_test_scan(scan_dir / "anomalous_1ch.tiff", channels=1, dense=True, seed=4)


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                deflated: bool = False, padding: int = 0, **tags) -> bytes:
    """A DX DICOM file (Explicit VR Little Endian, or Deflated) of integer pixels (H, W), frames (F, H, W) or RGB
    (H, W, 3), 4 mm spacing; `padding` zero bytes in a private tag (deflated ~1000:1)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = FileDataset("t.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "DX"
    if pixels.ndim == 3 and photometric != "RGB":
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[:2] if photometric == "RGB" else pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (pixels.shape[-1] if photometric == "RGB" else 1), photometric
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(pixels.dtype.kind == "i")
    ds.ImagerPixelSpacing = tags.pop("ImagerPixelSpacing", [4.0, 4.0])
    for key, value in tags.items():
        setattr(ds, key, value)
    if padding:
        ds.add_new(0x00091010, "OB", b"\0" * padding)
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
