"""Routing policy: tier thresholds from calibration, risk flags, fallbacks, reasons."""
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import NORMAL_SCORES

from detector.calibration import threshold_for_rate
from detector.policy import Decision, Policy, PolicyError, load_policy, parse_flags

ROOT = Path(__file__).resolve().parents[1]
META = {"normal_scores": NORMAL_SCORES}


@pytest.fixture
def policy() -> Policy:
    p = Policy.from_yaml(ROOT / "configs" / "policy.yaml")
    p.bind(META)
    return p


def test_shipped_policy_thresholds_follow_calibration(policy):
    assert list(policy.tiers) == ["whitelist", "standard", "high_risk"] and policy.default_tier == "standard"
    for tier, rate in policy.tiers.items():
        assert policy.thresholds[tier] == threshold_for_rate(NORMAL_SCORES, rate)
    assert policy.thresholds["whitelist"] > policy.thresholds["standard"] > policy.thresholds["high_risk"]
    assert policy.strictest == "high_risk"


def test_any_rate_not_only_precomputed(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("tiers:\n  a: {false_alarm_rate: 0.37}\n  b: 0.2\n")
    p = Policy.from_yaml(f)
    thr = p.bind(META)
    assert thr == {"a": threshold_for_rate(NORMAL_SCORES, 0.37), "b": threshold_for_rate(NORMAL_SCORES, 0.2)}
    assert p.default_tier == "a"  # first tier when none is named
    s = np.asarray(NORMAL_SCORES)
    assert np.mean(s >= thr["a"]) <= 0.37 and np.mean(s >= thr["b"]) <= 0.2


def test_decide_score_vs_tier_threshold(policy):
    t = policy.thresholds
    score = (t["standard"] + t["high_risk"]) / 2
    rel = policy.decide(score, "standard", [])
    assert isinstance(rel, Decision) and rel.decision == "RELEASE" and rel.tier == "standard"
    assert rel.threshold == t["standard"] and "threshold" in rel.reason and "0.01" in rel.reason
    ins = policy.decide(score, "high_risk", [])
    assert ins.decision == "INSPECT" and "high_risk" in ins.reason and "0.05" in ins.reason
    assert policy.decide(t["standard"], "standard").decision == "INSPECT"  # score == threshold inspects


def test_a_reason_never_prints_score_and_threshold_alike(policy):
    """At a fixed 4 decimals a released truck's reason read "score 0.9805 < threshold 0.9805" (detector.runtime's
    own reason already took as many decimals as set them apart)."""
    policy.thresholds["standard"] = 0.98052
    d = policy.decide(0.98048, "standard")
    assert d.decision == "RELEASE" and "score 0.98048 < threshold 0.98052 of tier standard" in d.reason
    assert "score 0.5000 < threshold 0.9805 " in policy.decide(0.5, "standard").reason


def test_default_and_unknown_tier(policy):
    score = (policy.thresholds["standard"] + policy.thresholds["high_risk"]) / 2
    assert policy.decide(score, None).tier == "standard"
    assert policy.decide(score, "  ").tier == "standard"
    d = policy.decide(score, "gold-card")
    assert d.tier == "high_risk" and d.decision == "INSPECT" and "unknown tier 'gold-card'" in d.reason


def test_a_tier_named_in_another_case_is_that_tier(policy):
    # a targeting system's STANDARD fell back to the strictest tier and inspected the truck at its rate
    score = (policy.thresholds["standard"] + policy.thresholds["high_risk"]) / 2
    for name in ("STANDARD", " Standard "):
        d = policy.decide(score, name)
        assert d.tier == "standard" and d.decision == "RELEASE" and "unknown tier" not in d.reason
    two = Policy(tiers={"Gold": 0.001, "GOLD": 0.01, "standard": 0.01})   # alike but for case: neither is guessed
    two.bind(META)
    assert two.resolve_tier("GOLD") == ("GOLD", "")
    tier, note = two.resolve_tier("gold")
    assert tier == two.strictest and "unknown tier 'gold'" in note


def test_risk_flags_any_and_list(policy, tmp_path):
    d = policy.decide(0.0, "whitelist", ["anything"])
    assert d.decision == "INSPECT" and "risk flag anything" in d.reason
    f = tmp_path / "p.yaml"
    f.write_text("tiers: {standard: 0.01}\nrisk_flags: {force: [intel_hit]}\n")
    p = Policy.from_yaml(f)
    p.bind(META)
    assert p.decide(0.0, None, ["late"]).decision == "RELEASE"
    assert p.decide(0.0, None, "late;intel_hit").decision == "INSPECT"
    assert p.decide(0.0, None, '["intel_hit"]').reason.startswith("risk flag intel_hit")
    assert p.decide(0.0, None, "INTEL_HIT").decision == "INSPECT"   # case is not a reason to release


def test_errors_and_bad_scores_inspect(policy):
    d = policy.decide(0.0, "whitelist", error="scan.tiff: truncated")
    assert d.decision == "INSPECT" and d.reason == "error: scan.tiff: truncated"
    for bad in (None, math.nan, math.inf):
        assert policy.decide(bad, "whitelist").decision == "INSPECT"
    assert policy.decide(0.0, "whitelist", "[not json").decision == "INSPECT"


def test_unbound_and_invalid_policies(tmp_path):
    with pytest.raises(PolicyError, match="bind"):
        Policy().decide(0.1)
    cases = {"rate.yaml": "tiers: {a: 1.5}\n", "default.yaml": "tiers: {a: 0.1}\ndefault_tier: b\n",
             "notiers.yaml": "risk_flags: {force: any}\n", "yaml.yaml": "tiers: [\n",
             "force.yaml": "tiers: {a: 0.1}\nrisk_flags: {force: some}\n", "type.yaml": "tiers: {a: high}\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(PolicyError, match=name):
            Policy.from_yaml(tmp_path / name)
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.from_yaml(tmp_path / "missing.yaml")
    # a misspelt key would have left the model's default threshold in force without a word
    typos = {"tierkey.yaml": ("tiers: {a: {rate: 0.05}}\n", r"tier 'a': unknown key\(s\) rate \(expected false_alarm_rate\)"),
             "top.yaml": ("tiers: {a: 0.1}\ndefault_teir: a\n", r"the policy: unknown key\(s\) default_teir"),
             "flags.yaml": ("tiers: {a: 0.1}\nrisk_flags: {forced: any}\n", r"risk_flags: unknown key\(s\) forced")}
    for name, (text, why) in typos.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(PolicyError, match=why):
            Policy.from_yaml(tmp_path / name)
    (tmp_path / "ok.yaml").write_text("tiers: {a: {false_alarm_rate: 0.05}, b: 0.01}\nrisk_flags: {force: [x]}\n")
    assert Policy.from_yaml(tmp_path / "ok.yaml").tiers == {"a": 0.05, "b": 0.01}


def test_model_default_and_table_fallback():
    p = load_policy(None)  # no file: one tier at the model's (possibly overridden) threshold
    assert p.bind(SimpleNamespace(metadata=META, threshold=0.123)) == {"default": 0.123}
    table = {"thresholds": [{"false_alarm_rate": 0.01, "threshold": 0.7}], "normal_scores": []}
    q = Policy(tiers={"std": 0.01, "odd": 0.02})
    with pytest.raises(PolicyError, match="odd"):
        q.bind(table)
    q = Policy(tiers={"std": 0.01})
    assert q.bind(table) == {"std": 0.7}


def test_a_tier_at_a_rate_of_the_table_routes_at_the_bundles_threshold():
    """Training writes the threshold table from the validation scores and normal_scores rounded to 6 decimals: a tier
    derived from those at the table's own rate sat up to 5e-7 off the threshold `detector info`, `score` without a
    policy and /readyz without one route at, so a truck there was RELEASEd by one and INSPECTed by the other."""
    from detector.bundle import default_threshold
    from detector.calibration import threshold_table
    raw = sorted(np.random.default_rng(3).uniform(0.0, 0.5, 200).tolist())
    meta = {"thresholds": threshold_table(raw, (0.01, 0.005)), "default_false_alarm_rate": 0.01,
            "normal_scores": [round(v, 6) for v in raw]}
    thr = Policy(tiers={"std": 0.01, "low": 0.005, "odd": 0.2}).bind(meta)
    assert thr["std"] == default_threshold(meta)[0] == meta["thresholds"][0]["threshold"]
    assert thr["low"] == meta["thresholds"][1]["threshold"]
    assert thr["odd"] == threshold_for_rate(meta["normal_scores"], 0.2)   # a rate the table lacks: derived


def test_bind_to_real_inspector(heuristic_model):
    from detector.runtime import Inspector
    p = Policy(tiers={"a": 0.01, "b": None})
    thr = p.bind(Inspector(heuristic_model, threads=1))
    assert thr["a"] == threshold_for_rate(NORMAL_SCORES, 0.01) and thr["b"] == pytest.approx(thr["a"])


def test_parse_flags():
    assert parse_flags(None) == [] and parse_flags("") == [] and parse_flags([]) == []
    assert parse_flags("a, b;c|d") == ["a", "b", "c", "d"]
    assert parse_flags('["x", " y "]') == ["x", "y"]
    with pytest.raises(ValueError):
        parse_flags({"a": 1})


def test_rate_one_inspects_every_scan():
    # a tier meant to inspect all gets threshold 0, with the bundle's normal scores or only its table
    for meta in (META, {"normal_scores": [], "thresholds": [{"false_alarm_rate": 0.01, "threshold": 0.7}]}):
        p = Policy(tiers={"standard": 0.01, "inspect_all": 1.0}, default_tier="standard")
        assert p.bind(meta)["inspect_all"] == 0.0
        assert p.decide(0.0, "inspect_all").decision == "INSPECT"
        assert p.decide(min(NORMAL_SCORES) / 2, "standard").decision == "RELEASE"


def test_duplicate_keys_refused(tmp_path):
    f = tmp_path / "dup.yaml"   # the second whitelist used to replace the first without a word
    f.write_text("tiers:\n  whitelist: 0.001\n  standard: 0.01\n  whitelist: 0.2\ndefault_tier: standard\n")
    with pytest.raises(PolicyError, match=r"dup.yaml: not valid YAML \(duplicate key 'whitelist' \(line 4\)\)"):
        Policy.from_yaml(f)
    f.write_text("tiers: {a: 0.1}\ndefault_tier: a\ndefault_tier: a\n")
    with pytest.raises(PolicyError, match="duplicate key 'default_tier'"):
        Policy.from_yaml(f)
    assert Policy.from_yaml(ROOT / "configs" / "policy.yaml").tiers["whitelist"] == 0.001


def test_request_text_in_reasons_is_bounded(policy):
    # a client's 1 MB tier name or flag was copied whole into the reason of the answer and audit row
    d = policy.decide(policy.thresholds["high_risk"], "t" * 1_000_000)
    assert d.tier == "high_risk" and d.decision == "INSPECT" and len(d.reason) < 400
    assert d.reason.startswith("unknown tier '" + "t" * 80 + "...'")
    f = policy.decide(0.0, "whitelist", ["x" * 1_000_000, "intel_hit"])
    assert f.decision == "INSPECT" and len(f.reason) < 400


def test_a_flag_that_is_not_text_inspects_and_is_refused_in_a_policy(tmp_path):
    # [{"code": "intel_hit"}], [["intel_hit"]] or [null] were stringified ("{'code': 'intel_hit'}", "None"), matched
    # no forcing flag of a list policy, and the truck was released
    f = tmp_path / "p.yaml"
    f.write_text("tiers: {standard: 0.01}\nrisk_flags: {force: [intel_hit, 101]}\n")
    p = Policy.from_yaml(f)
    p.bind(META)
    assert p.force_flags == ["intel_hit", "101"]
    for flags in ([{"code": "intel_hit"}], [["intel_hit"]], [None], [True], '["late", null]'):
        d = p.decide(0.0, None, flags)
        assert d.decision == "INSPECT" and "unreadable risk flags (a flag must be text, got" in d.reason, flags
    assert p.decide(0.0, None, [101]).decision == "INSPECT"   # a targeting system's numeric code is its text
    assert p.decide(0.0, None, ["late", 7]).decision == "RELEASE"
    for force in ("[intel_hit, null]", "[[intel_hit]]", "[{code: intel_hit}]", "[yes]"):
        f.write_text(f"tiers: {{standard: 0.01}}\nrisk_flags: {{force: {force}}}\n")
        with pytest.raises(PolicyError, match=r"p.yaml: risk_flags.force: a flag must be text, got"):
            Policy.from_yaml(f)
