"""Scan views, overlays, plots and the self-contained HTML report."""
import re

import cv2
import numpy as np

from detector import report


def _att(h=60, w=200):
    att = np.full((2, h, w), 0.05, np.float32)  # mostly air
    att[:, 20:50, 40:120] = 2.0  # cargo
    att[:, 30:40, 60:70] = 5.0  # a dense block
    return att


def test_window_air_bright_dense_dark():
    v = report.window(_att()[0])
    assert v.dtype == np.uint8
    assert v[5, 5] > 200 and v[35, 65] < 30 and v[5, 5] > v[25, 45] > v[35, 65]


def test_render_boxes_banner_and_downscale():
    img = report.render(_att(), regions=[{"box": [60, 30, 70, 40], "score": 0.9}],
                        heatmap=np.ones((6, 20), np.float32) * 0.9,
                        banner="INSPECT score 0.900 threshold 0.500", flagged=True)
    assert img.shape == (60 + 28, 200, 3)
    b, g, r = img[5, 100]  # banner pixel: red when flagged
    assert r > 150 and b < 100
    long = report.render(np.zeros((1, 1000, 10000), np.float32), banner="RELEASE", flagged=False)
    bar = long.shape[0] - round(1000 * long.shape[1] / 10000)
    assert long.shape[1] <= report.MAX_WIDTH and long.shape[0] <= report.MAX_HEIGHT + bar
    assert abs(long.shape[1] / (long.shape[0] - bar) - 10) < 0.2 and bar < 100  # aspect kept
    plain = report.render(_att(), truth_boxes=[[60, 30, 70, 40]])
    b, g, r = (int(v) for v in plain[30, 61])  # the top edge of the true box is green (a dash at its corner)
    assert plain.shape == (60, 200, 3) and g > r + 80 and g > b + 80


def test_a_narrow_scans_banner_is_not_cut_off():
    """The banner was one line at one size: on a 256 px wide picture (a baggage scan, a close-up) it stopped inside
    the threshold and the scan's name was cut off."""
    text = report.verdict_banner("INSPECT", 0.013, 0.007, "scan_0018")
    for w in (256, 120):
        img = report.render(_att(256, w), banner=text, flagged=True)
        bar = img[:img.shape[0] - 256]
        white = np.all(bar > 200, axis=-1)
        assert white.any() and not white[:, -4:].any(), w      # text drawn, none of it running off the right edge


def test_banner_prints_score_and_threshold_apart():
    """At 3 decimals a released truck's banner read "RELEASE score 0.980 threshold 0.980" (the reason, in
    detector.runtime, already took as many decimals as set them apart)."""
    text = report.verdict_banner("RELEASE", 0.98012, 0.9804)
    score, threshold = re.findall(r"score (\S+)  threshold (\S+)", text)[0]
    assert score != threshold and float(score) < float(threshold)
    assert report.verdict_banner("INSPECT", 0.9, 0.5) == "INSPECT  score 0.900  threshold 0.500"
    assert report.verdict_banner("INSPECT", None, 0.5, "a") == "INSPECT  score -  threshold 0.500  a"


def test_plots_and_html_self_contained(tmp_path):
    roc = report.plot_roc({"all": (np.array([0, 0, 0.5, 1]), np.array([0, 0.5, 1, 1]))}, tmp_path / "roc.png",
                          [(0.01, 0.5, "1% FA")])
    hist = report.plot_histogram(np.random.rand(50), np.random.rand(20), tmp_path / "hist.png", [(0.5, "t")])
    assert cv2.imread(str(roc)).shape[0] > 200 and cv2.imread(str(hist)) is not None
    overall = {"n": 3, "n_normal": 2, "n_anomalous": 1, "n_failed": 0, "auroc": 0.5, "ap": 0.5, "notes": ["a note"],
               "detection_at_far": [], "far_at_detection": []}
    thumb = report.render(_att())
    page = report.html_report(tmp_path / "r.html", {"overall": overall}, {"roc": roc, "hist": hist},
                              {"Worst misses": [(thumb, "x.tiff <b>")], "Worst false alarms": []})
    text = page.read_text()
    srcs = re.findall(r"src='([^']*)'", text)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "x.tiff &lt;b&gt;" in text and "a note" in text and "<link" not in text


def test_plot_text_is_drawn_as_written_and_thresholds_print_apart(tmp_path):
    """An anomaly type such as `cash $_{x$` was read by matplotlib as a formula and raised in plot_roc, ending eval
    before report.html was written; now it is drawn as written. The report's threshold tables printed a confident
    model's thresholds with 4 decimals, 0.99996 and 0.99997 both as 1.0000; now with the decimals that keep them
    apart."""
    curve = (np.array([0, 0, 0.5, 1]), np.array([0, 0.5, 1, 1]))
    roc = report.plot_roc({"all": curve, "cash $_{x$": curve}, tmp_path / "roc.png", [(0.01, 0.5, "$_{bad")])
    hist = report.plot_histogram(np.random.rand(50), np.random.rand(20), tmp_path / "hist.png", [(0.5, "t $_{x$")])
    assert cv2.imread(str(roc)) is not None and cv2.imread(str(hist)) is not None
    far = [{"false_alarm_rate": r, "threshold": t, "detection_rate": 0.5, "achieved_rate": r, "resolvable": True}
           for r, t in ((0.01, 0.99996), (0.001, 0.99997), (0.005, None))]
    overall = {"n": 3, "n_normal": 2, "n_anomalous": 1, "n_failed": 0, "auroc": 0.5, "ap": 0.5, "notes": [],
               "detection_at_far": far, "far_at_detection": []}
    text = report.html_report(tmp_path / "r.html", {"overall": overall}, {"roc": roc, "hist": hist}, {}).read_text()
    assert "<td>0.99996</td>" in text and "<td>0.99997</td>" in text and "<td>1.0000</td>" not in text


def test_a_cut_table_or_metrics_json_says_so(tmp_path):
    """The failed-scan table shows its first 100 rows and the metrics.json block its first 20,000 characters; both
    were cut without a word, so an officer could read the list as whole. Each now says where the rest is."""
    overall = {"n": 300, "n_normal": 300, "n_anomalous": 0, "n_failed": 300, "auroc": None, "ap": None, "notes": [],
               "detection_at_far": [], "far_at_detection": []}
    failures = [{"path": f"scans/truck_{i:04d}.tiff", "label": 0, "error": "x" * 80} for i in range(300)]
    page = report.html_report(tmp_path / "r.html", {"overall": overall, "failures": failures}, {}, {}).read_text()
    assert "Failed scans (300, counted as INSPECT; the first 100 shown, all in metrics.json)" in page
    assert "truck_0099" in page.split("<h2>metrics.json")[0] and "truck_0100" not in page.split("<h2>metrics.json")[0]
    assert "the whole is metrics.json beside this report" in page
    few = report.html_report(tmp_path / "f.html", {"overall": overall, "failures": failures[:3]}, {}, {}).read_text()
    assert "Failed scans (3, counted as INSPECT)" in few and "the whole is" not in few


def _bar_grey(img: np.ndarray, rows: int) -> int:
    """The grey level most of a banner's pixels have (its background, text and stripes aside)."""
    grey = cv2.cvtColor(img[:rows], cv2.COLOR_BGR2GRAY)
    return int(np.bincount(grey.ravel()).argmax())


def test_inspect_and_release_banners_differ_in_more_than_hue():
    """INSPECT's red bar and RELEASE's dark grey one had grey levels 81 and 60: the same bar to a red-green
    colour-blind officer or on a monochrome monitor. They now differ in brightness, and INSPECT carries stripes."""
    shown = {d: report.render(_att(100, 900), banner=report.verdict_banner(d, 0.9, 0.5, "truck_7"),
                              flagged=d == "INSPECT") for d in ("INSPECT", "RELEASE")}
    rows = shown["RELEASE"].shape[0] - 100
    assert abs(_bar_grey(shown["INSPECT"], rows) - _bar_grey(shown["RELEASE"], rows)) > 100
    stripes = cv2.cvtColor(shown["INSPECT"][rows // 2: rows // 2 + 1, -200:], cv2.COLOR_BGR2GRAY)
    assert stripes.max() - stripes.min() > 150            # light and dark stripes across the end of the bar


def test_banner_text_stays_readable_when_a_viewer_fits_a_long_scan_to_the_screen():
    """A 4000 px scan's overlay is 2400 px wide and a viewer fits it to a 1920 px screen: the banner's letters, drawn at
    one size for every width, were 9 px high there. They now grow with the picture (at least 16 px there)."""
    for decision in ("INSPECT", "RELEASE"):
        img = report.render(_att(1000, 4000), banner=report.verdict_banner(decision, 0.9, 0.5, "truck_7"),
                            flagged=decision == "INSPECT")
        assert img.shape[1] == report.MAX_WIDTH
        fitted = cv2.resize(img, (1920, round(img.shape[0] * 1920 / img.shape[1])), interpolation=cv2.INTER_AREA)
        rows = round((img.shape[0] - 600) * 1920 / img.shape[1])                # the bar over the 2400 x 600 scan
        bar = cv2.cvtColor(fitted[:rows, :300], cv2.COLOR_BGR2GRAY).astype(int)  # the start of the bar: its text
        ink = np.flatnonzero((np.abs(bar - bar[1, 1]) > 100).any(axis=1))
        assert ink.size and ink[-1] - ink[0] + 1 >= 16, (decision, ink)


def test_true_boxes_are_dashed_apart_from_the_models_solid_ones(tmp_path):
    """The model's regions were solid red boxes and the true anomaly solid green ones, told apart by hue alone (the
    same to a red-green colour-blind officer reading the report's worst misses). The true box is now dashed."""
    box = [40, 20, 180, 50]

    def edge(**kw):     # share of the top edge's pixels the box's colour covers
        img = report.render(np.zeros((1, 60, 200), np.float32), **kw).astype(int)
        return np.mean(np.abs(img[20, 40:180] - img[5, 5]).sum(axis=1) > 60)
    assert edge(regions=[{"box": box, "score": 0.9}]) > 0.95               # solid
    assert 0.3 < edge(truth_boxes=[box]) < 0.75                             # dashes and gaps
    overall = {"n": 1, "n_normal": 0, "n_anomalous": 1, "n_failed": 0, "auroc": None, "ap": None, "notes": [],
               "detection_at_far": [], "far_at_detection": []}
    page = report.html_report(tmp_path / "r.html", {"overall": overall}, {},
                              {"Worst misses": [(report.render(_att(), truth_boxes=[box]), "x")]}).read_text()
    assert "dashed green" in page


def test_roc_points_on_one_spot_get_one_label(tmp_path, monkeypatch):
    """A confident model's 0.1 %, 0.5 % and 1 % operating points fall on one spot: their three labels were drawn over
    one another and read '0.3% FA'. One spot now carries one label naming them all."""
    drawn = []
    save = report._save_figure
    monkeypatch.setattr(report, "_save_figure", lambda plt, fig, path: drawn.append(
        [t.get_text() for t in fig.axes[0].texts]) or save(plt, fig, path))
    marks = [(0.0, 1.0, "0.1% FA"), (0.0, 1.0, "0.5% FA"), (0.0, 1.0, "1.0% FA"), (0.2, 0.9, "as routed")]
    report.plot_roc({"all": (np.array([0, 0, 1]), np.array([0, 1, 1]))}, tmp_path / "roc.png", marks)
    assert drawn == [["0.1% FA, 0.5% FA, 1.0% FA", "as routed"]]


def test_a_regions_score_at_the_pictures_right_edge_is_not_cut_off():
    """A region's score was written from its box's left corner on: a region at the truck's end (the picture's right
    edge) lost its digits past the edge. The label now moves left to stay whole."""
    def label_ink(box):     # red pixels above the box: its score label
        img = report.render(np.zeros((1, 60, 200), np.float32), regions=[{"box": box, "score": 0.87}]).astype(int)
        above = img[:box[1] - 1]
        return int(((above[..., 2] > 150) & (above[..., 0] < 120)).sum())
    whole = label_ink([80, 30, 100, 50])
    assert whole > 20 and label_ink([192, 30, 200, 50]) >= 0.9 * whole
