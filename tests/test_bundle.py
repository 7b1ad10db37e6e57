"""Bundle metadata: round trip, and clear errors for foreign, tampered or outdated files."""
import json

import onnx
import pytest
from onnx import TensorProto, helper

from detector.bundle import (METADATA_KEY, SCHEMA_VERSION, BundleError, attach_metadata, default_threshold,
                             make_metadata, read_metadata, validate_metadata)


def _with_props(src, dst, value):
    """Copy a bundle, replacing its detector metadata text (None: remove it)."""
    m = onnx.load(str(src))
    keep = [(p.key, p.value) for p in m.metadata_props if p.key != METADATA_KEY]
    del m.metadata_props[:]
    for k, v in keep:
        m.metadata_props.add(key=k, value=v)
    if value is not None:
        m.metadata_props.add(key=METADATA_KEY, value=value)
    onnx.save(m, str(dst))
    return dst


def test_round_trip_carries_thresholds_and_preprocessing(heuristic_model):
    meta = read_metadata(heuristic_model)
    assert meta["schema_version"] == SCHEMA_VERSION and meta["channels"] == 2 and meta["stride"] == 8
    assert meta["preprocessing"]["model_pitch_mm"] == meta["pitch_mm"] == 10.0
    assert meta["normal_scores"] == sorted(meta["normal_scores"]) and len(meta["normal_scores"]) == 300
    thr, rate = default_threshold(meta)
    assert rate == 0.01 and sum(s >= thr for s in meta["normal_scores"]) / 300 <= 0.01
    assert meta["package_version"] and meta["created"]


def test_foreign_onnx_file_is_refused(tmp_path):
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "f.onnx"))
    with pytest.raises(BundleError, match="not a detector model bundle") as e:
        read_metadata(tmp_path / "f.onnx")
    assert "f.onnx" in str(e.value)


def test_not_onnx_and_missing_file(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"definitely not protobuf")
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        read_metadata(tmp_path / "x.onnx")
    with pytest.raises(BundleError, match="not found"):
        read_metadata(tmp_path / "missing.onnx")


def test_tampered_json_and_old_schema(heuristic_model, tmp_path):
    with pytest.raises(BundleError, match="not valid JSON"):
        read_metadata(_with_props(heuristic_model, tmp_path / "t.onnx", '{"schema_version": 1, "chan'))
    meta = read_metadata(heuristic_model)
    old = _with_props(heuristic_model, tmp_path / "o.onnx", json.dumps({**meta, "schema_version": 0}))
    with pytest.raises(BundleError, match="schema_version 0 is not supported"):
        read_metadata(old)
    assert read_metadata(old, validate=False)["schema_version"] == 0


@pytest.mark.parametrize("change, message", [
    ({"thresholds": None}, "missing field"),
    ({"channels": 3}, "channels must be 1 or 2"),
    ({"energies": ["high"]}, "energies"),
    ({"stride": 0}, "stride"),
    ({"score": {"method": "max"}}, "score method"),
    ({"preprocessing": {"scale": 3.0}}, "preprocessing lacks"),
    ({"thresholds": [{"threshold": "high"}]}, "threshold row"),
    ({"thresholds": [{"threshold": 39.6, "false_alarm_rate": 0.01}]}, r"must lie in \[0, 1\]"),  # x100 typo: releases all
    ({"normal_scores": [0.2, 1.5]}, "normal_scores"),
    ({"pitch_mm": 5.0}, "pitch_mm 5.0 differs from preprocessing model_pitch_mm 10.0"),   # info showed 5, ran at 10
    ({"thresholds": [{"threshold": 0.9, "false_alarm_rate": 0.01}, {"threshold": 0.2, "false_alarm_rate": 0.001}]},
     r"out of order: rate 0.001 has threshold 0.2, under the 0.9 of the higher rate 0.01"),
    ({"thresholds": [{"threshold": 0.99, "false_alarm_rate": 0.01}, {"threshold": 0.4, "false_alarm_rate": 0.01}]},
     "false_alarm_rate twice"),
    ({"default_pitch_mm": 0}, r"default_pitch_mm 0 must be a pitch in 0\.01-100 mm"),
    ({"default_pitch_mm": "4"}, "default_pitch_mm '4' must be a pitch"),
    ({"default_pitch_mm": True}, "default_pitch_mm True must be a pitch"),
])
def test_validate_names_the_problem(heuristic_model, change, message):
    meta = read_metadata(heuristic_model)
    meta.update(change)
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(BundleError, match=message):
        validate_metadata(meta, "m.onnx")


def test_the_default_pitch_for_untagged_files_is_optional(heuristic_model):
    """A bundle of a run with data.pitch_mm carries it (default_pitch_mm); one without it, and every older one,
    loads as before and reads such files at 5 mm."""
    from detector.bundle import untagged_pitch_mm
    meta = read_metadata(heuristic_model)
    assert "default_pitch_mm" not in meta and untagged_pitch_mm(validate_metadata(meta)) == 5.0
    assert untagged_pitch_mm(validate_metadata({**meta, "default_pitch_mm": 4})) == 4.0


def test_attach_replaces_and_refuses_invalid(heuristic_model):
    m = onnx.load(str(heuristic_model))
    meta = read_metadata(heuristic_model)
    attach_metadata(m, make_metadata(**{**meta, "default_false_alarm_rate": 0.005}))
    props = [p for p in m.metadata_props if p.key == METADATA_KEY]
    assert len(props) == 1 and json.loads(props[0].value)["default_false_alarm_rate"] == 0.005
    with pytest.raises(BundleError, match="missing field"):
        attach_metadata(m, make_metadata(channels=2))


@pytest.mark.parametrize("key, value", [("clip_max", -1.0), ("scale", -4.0), ("scale", 0), ("pad_multiple", 0),
                                        ("pad_multiple", 32.5), ("model_pitch_mm", 0), ("scale", "4"),
                                        ("repair_rows", "no")])
def test_preprocessing_constants_are_checked(heuristic_model, tmp_path, key, value):
    """clip_max or scale <= 0 turned every scan into air and released every truck; 0 pitch or pad crashed later."""
    from detector.runtime import Inspector

    meta = read_metadata(heuristic_model)
    meta["preprocessing"][key] = value
    with pytest.raises(BundleError, match=f"preprocessing {key}"):
        Inspector(_with_props(heuristic_model, tmp_path / "p.onnx", json.dumps(meta)), threads=1)


def _sealed(heuristic_model, path):
    """The heuristic bundle written as `detector export` writes one: with its graph's SHA-256 in the metadata."""
    from detector.export import write_bundle
    return write_bundle(heuristic_model, read_metadata(heuristic_model), path)


def test_a_damaged_graph_is_refused_by_every_reader(heuristic_model, heuristic_model_1ch, tmp_path, anomalous_scan_path,
                                                    capsys):
    """A changed weight byte (a damaged copy) loaded and ran: the station routed trucks on a model nobody trained.
    Export records the graph's SHA-256; the Inspector, `detector info` and `detector calibrate` check it."""
    import numpy as np

    from detector.cli import main as cli
    from detector.runtime import Inspector

    sealed = _sealed(heuristic_model, tmp_path / "sealed.onnx")
    meta = read_metadata(sealed)
    assert len(meta["graph_sha256"]) == 64 and Inspector(sealed, threads=1).inspect(anomalous_scan_path)
    assert cli(["info", str(sealed)]) == 0 and f"graph       sha256 {meta['graph_sha256']}" in capsys.readouterr().out
    data = sealed.read_bytes()
    b = np.float32(2.5 / 4.0).tobytes()          # the heuristic's offset `b`: every score moves with it
    assert data.count(b) == 1
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(data.replace(b, np.float32(9.0).tobytes()))
    for read in (lambda: read_metadata(damaged), lambda: Inspector(damaged, threads=1)):
        with pytest.raises(BundleError, match="not the one this bundle was exported with") as e:
            read()
        assert str(damaged) in str(e.value)
    assert cli(["info", str(damaged)]) == 2 and "damaged or altered after export" in capsys.readouterr().err
    # the metadata of one bundle put on another graph is refused too; a metadata rewrite keeps the digest valid
    moved = _with_props(heuristic_model_1ch, tmp_path / "moved.onnx",
                        json.dumps({**meta, "channels": 1, "energies": ["single"]}))
    with pytest.raises(BundleError, match="not the one this bundle"):
        read_metadata(moved)
    from detector.bundle import rewrite_metadata
    again = rewrite_metadata(sealed, tmp_path / "again.onnx", {**meta, "default_false_alarm_rate": 0.005})
    assert read_metadata(again)["graph_sha256"] == meta["graph_sha256"]


def test_a_graph_that_takes_other_channels_than_the_metadata_says_is_no_bundle(heuristic_model, tmp_path, capsys):
    """Only the Inspector compared the graph with the metadata: `detector info` described a 2-energy graph as a
    1-energy model and `detector calibrate` wrote a site bundle of it, which no station could then load."""
    from detector.cli import main as cli

    meta = read_metadata(heuristic_model)
    bad = _with_props(heuristic_model, tmp_path / "one.onnx", json.dumps({**meta, "channels": 1, "energies": ["x"]}))
    with pytest.raises(BundleError, match=r"input 'scan' has shape .*metadata says 1 channel") as e:
        read_metadata(bad)
    assert str(bad) in str(e.value)
    assert cli(["info", str(bad)]) == 2 and "metadata says 1 channel" in capsys.readouterr().err
    assert cli(["calibrate", str(tmp_path / "cleared.csv"), "--model", str(bad), "--out", str(tmp_path / "s.onnx")]) == 2
    assert "metadata says 1 channel" in capsys.readouterr().err and not (tmp_path / "s.onnx").exists()
