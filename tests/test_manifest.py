"""Dataset folders read one way: the manifest's cells checked with their row, the plain layout at any depth."""
import os

import numpy as np
import pytest

from detector.evaluate import load_truth
from detector.manifest import boxes_of, label_of, layout_files, read_rows
from detector.scan import ScanError, write_scan


def _manifest(tmp_path, text: str, bom: bool = False):
    path = tmp_path / "manifest.csv"
    path.write_bytes(("\ufeff" if bom else "").encode("utf-8") + text.encode("utf-8"))
    return path


def test_rows_labels_and_boxes_are_checked_with_their_row_number(tmp_path):
    m = _manifest(tmp_path, 'path,label,boxes\na.tiff,1,"[[1, 2, 30, 40]]"\nb.tiff,0.0,\n\nc.tiff,2,\n'
                            'd.tiff,1,"[[1, 2, 3]]"\ne.tiff,yes,\nf.tiff,1,"[[1,2"\n', bom=True)   # Excel's BOM
    rows = read_rows(m)
    assert [r["path"] for r in rows] == ["a.tiff", "b.tiff", "c.tiff", "d.tiff", "e.tiff", "f.tiff"]
    assert [r["_row"] for r in rows] == [2, 3, 5, 6, 7, 8]                    # the blank line keeps its number
    assert label_of(rows[0], m) == 1 and label_of(rows[1], m) == 0
    assert boxes_of(rows[0], m) == [[1, 2, 30, 40]] and boxes_of(rows[1], m) == []
    with pytest.raises(ScanError, match=r"row 5: label '2' is not 0 \(normal\) or 1"):
        label_of(rows[2], m)
    with pytest.raises(ScanError, match=r"row 7: label 'yes'"):
        label_of(rows[4], m)
    for row, n in ((rows[3], 6), (rows[5], 8)):
        with pytest.raises(ScanError, match=rf"row {n}: boxes .* is not a JSON list of \[x0, y0, x1, y1\]"):
            boxes_of(row, m)


def test_missing_columns_and_repeated_paths_name_the_manifest(tmp_path):
    m = _manifest(tmp_path, "file,label\na.tiff,0\n")
    with pytest.raises(ScanError, match=r"manifest\.csv: manifest needs the column\(s\) path \(has file,label\)"):
        read_rows(m)
    assert read_rows(_manifest(tmp_path, "path,tier\na.tiff,standard\n"), need=("path",))[0]["tier"] == "standard"
    with pytest.raises(ScanError, match=r"row 4: a\.tiff is listed again \(row 2\)"):
        read_rows(_manifest(tmp_path, "path,label\na.tiff,0\nb.tiff,1\na.tiff,1\n"))


def test_training_and_evaluation_read_the_same_nested_plain_layout(tmp_path):
    pytest.importorskip("torch")
    from detector.records import load_records
    counts = np.full((2, 20, 40), 50000, np.uint16)
    for rel in ("normal/site1/n0.tiff", "normal/n1.tiff", "anomalous/site2/day3/a0.tiff", "anomalous/.hidden.tiff"):
        write_scan(tmp_path / rel, counts)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a0.png").write_bytes(b"")
    (tmp_path / "normal" / "notes.txt").write_text("not a scan")
    files = layout_files(tmp_path)
    assert [(p.relative_to(tmp_path).as_posix(), label, m is not None) for p, label, m in files] == [
        ("normal/n1.tiff", 0, False), ("normal/site1/n0.tiff", 0, False), ("anomalous/site2/day3/a0.tiff", 1, True)]
    truth, _ = load_truth(tmp_path)
    records = load_records(tmp_path)
    assert [str(t.path) for t in truth] == [str(p.resolve()) for p, _, _ in files] == [r.path for r in records]
    assert [t.rel for t in truth] == ["normal/n1.tiff", "normal/site1/n0.tiff", "anomalous/site2/day3/a0.tiff"]
    assert [t.label for t in truth] == [r.label for r in records] == [0, 0, 1]


def test_a_plain_layout_mask_whose_stem_names_two_anomalous_scans_is_refused(tmp_path):
    counts = np.random.default_rng(0).integers(20000, 50000, (1, 20, 40)).astype(np.uint16)
    for rel in ("normal/0001.tiff", "anomalous/site1/0001.tiff", "anomalous/site2/0002.tiff"):
        write_scan(tmp_path / rel, counts)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "0001.png").write_bytes(b"")
    assert [m is not None for _, _, m in layout_files(tmp_path)] == [False, True, False]  # a normal stem is no clash
    write_scan(tmp_path / "anomalous/site2/0001.tiff", counts)      # another site's scan 0001
    with pytest.raises(ScanError, match=r"0001\.png: one mask for 2 anomalous scans with the stem '0001' "
                                        r"\(anomalous/site1/0001\.tiff, anomalous/site2/0001\.tiff\)"):
        layout_files(tmp_path)


def test_a_manifest_or_scan_list_that_is_not_utf8_names_the_file_and_line(tmp_path):
    """A spreadsheet's "CSV" in the Windows code page (an é in a type or a file name): training ended in a
    UnicodeDecodeError traceback, and score and eval printed the codec's words without the file."""
    from detector.evaluate import load_results
    from detector.sources import discover
    text = "path,label,anomaly_type\na.tiff,0,none\nb.tiff,1,stupéfiants\n"
    (tmp_path / "manifest.csv").write_bytes(text.encode("cp1252"))
    with pytest.raises(ScanError, match=r"manifest\.csv: line 3 is not UTF-8 text .*save it as UTF-8"):
        read_rows(tmp_path / "manifest.csv")
    (tmp_path / "scans.txt").write_bytes("a.tiff\ncafé.tiff\n".encode("cp1252"))
    with pytest.raises(ScanError, match=r"scans\.txt: line 2 is not UTF-8 text"):
        discover(str(tmp_path / "scans.txt"))
    (tmp_path / "results.csv").write_bytes("path,score,decision,error\nb.tiff,0.5,RELEASE,\ncafé.tiff,,INSPECT,x\n"
                                           .encode("cp1252"))   # a results CSV saved again by a spreadsheet
    with pytest.raises(ScanError, match=r"results\.csv: line 3 is not UTF-8 text"):
        load_results(tmp_path / "results.csv")
    (tmp_path / "bom.txt").write_bytes("\ufeffa.tiff\n".encode("utf-8"))   # Notepad's byte-order mark
    assert [i.path.name for i in discover(str(tmp_path / "bom.txt"))[0]] == ["a.tiff"]


def test_a_manifest_written_on_windows_names_its_files_with_backslashes(tmp_path):
    r"""images\a.tiff, as a Windows tool or spreadsheet writes it: on Linux every scan was "file not found", in
    training (all left out), scoring (every row failed) and evaluation (no truth matched)."""
    pytest.importorskip("torch")
    from detector.records import load_records
    from detector.sources import discover
    counts = np.random.default_rng(0).integers(20000, 50000, (1, 20, 40)).astype(np.uint16)
    write_scan(tmp_path / "images" / "a.tiff", counts)
    write_scan(tmp_path / "images" / "b.tiff", counts)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "b.png").write_bytes(b"")
    _manifest(tmp_path, "path,label,mask\nimages\\a.tiff,0,\n.\\images\\b.tiff,1,masks\\b.png\n")
    records = load_records(tmp_path)
    assert [(os.path.exists(r.path), r.mask and os.path.exists(r.mask)) for r in records] == [(True, None),
                                                                                               (True, True)]
    truth, _ = load_truth(tmp_path)
    assert [t.path.is_file() for t in truth] == [True, True] and truth[1].mask.is_file()
    assert [i.path.is_file() for i in discover(str(tmp_path))[0]] == [True, True]
    with pytest.raises(ScanError, match=r"row 3: images/a\.tiff is listed again \(row 2\)"):
        read_rows(_manifest(tmp_path, "path,label\nimages\\a.tiff,0\nimages/a.tiff,0\n"))


def test_training_finds_a_scan_and_mask_whose_names_a_mac_decomposed(tmp_path):
    """A manifest typed on Linux composes ü (NFC); scans and masks copied from a Mac keep it decomposed (NFD). Scoring
    and eval found them (manifest.on_disk); training read each such row as "file not found" and left it out."""
    import unicodedata
    pytest.importorskip("torch")
    from detector.records import load_records
    counts = np.random.default_rng(0).integers(20000, 50000, (1, 20, 40)).astype(np.uint16)
    nfd = lambda name: unicodedata.normalize("NFD", name)  # noqa: E731
    write_scan(tmp_path / "images" / nfd("lkw_müller.tiff"), counts)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / nfd("lkw_müller.png")).write_bytes(b"")
    _manifest(tmp_path, "path,label,mask\nimages/lkw_müller.tiff,1,masks/lkw_müller.png\n")
    (r,) = load_records(tmp_path)
    assert os.path.exists(r.path) and os.path.exists(r.mask)


def test_layout_folders_named_in_another_case_are_named_in_the_refusal(tmp_path):
    """Normal/ and Anomalous/ (as a Windows user names folders): "scans but no labels: put them in normal/ and
    anomalous/ sub-folders" told the user to do what they had done."""
    from detector.manifest import not_a_dataset
    counts = np.random.default_rng(0).integers(20000, 50000, (1, 20, 40)).astype(np.uint16)
    write_scan(tmp_path / "Normal" / "n.tiff", counts)
    write_scan(tmp_path / "Anomalous" / "a.tiff", counts)
    assert not_a_dataset(tmp_path) == ("no normal/ or anomalous/ folder, but Anomalous/, Normal/: the layout's folder "
                                       "names are lower case")


def test_a_mask_cell_with_spaces_around_it_names_the_mask(tmp_path):
    """The path cell was stripped and the mask cell not: "masks/b.png " (a spreadsheet's stray space) was a mask
    "not found" in training, and no truth box in evaluation."""
    pytest.importorskip("torch")
    from detector.records import load_records
    counts = np.random.default_rng(0).integers(20000, 50000, (1, 20, 40)).astype(np.uint16)
    write_scan(tmp_path / "b.tiff", counts)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "b.png").write_bytes(b"")
    _manifest(tmp_path, "path,label,mask\n b.tiff ,1, masks/b.png \n")
    assert os.path.exists(load_records(tmp_path)[0].mask)
    assert load_truth(tmp_path)[0][0].mask.is_file()


def test_a_truncated_mask_png_is_refused_by_name_and_prints_nothing_else(tmp_path, capfd):
    """Masks are read apart from scans: one cut short printed libpng's line naming no file, as scans did."""
    import cv2
    from detector.manifest import read_mask
    m = np.zeros((40, 60), np.uint8)
    m[10:20, 5:25] = 255
    ok, data = cv2.imencode(".png", m)
    (tmp_path / "m.png").write_bytes(data.tobytes())
    assert (read_mask(tmp_path / "m.png") > 0).sum() == 200
    for cut in (12, 2):                     # the whole end chunk; only its checksum's last bytes
        (tmp_path / "cut.png").write_bytes(data.tobytes()[:-cut])
        with pytest.raises(ScanError, match="cut.png.*truncated mask PNG"):
            read_mask(tmp_path / "cut.png")
    with pytest.raises(ScanError, match="nope.png.*unreadable mask PNG"):
        read_mask(tmp_path / "nope.png")
    assert capfd.readouterr().err == ""


def test_a_semicolon_separated_manifest_is_told_so(tmp_path):
    m = _manifest(tmp_path, "path;label\na.tiff;0\n")
    with pytest.raises(ScanError, match="needs the column.*separated by ';'.*save it with commas"):
        read_rows(m)
    with pytest.raises(ScanError) as e:      # a comma manifest lacking a column gets no such hint
        read_rows(_manifest(tmp_path, "path,kind\na.tiff,0\n"))
    assert ";" not in str(e.value)


@pytest.mark.parametrize("header, meant", [("Label", "label"), ("bbox", "boxes"), ("masks", "mask"),
                                           ("Split", "split"), ("anomaly type", "anomaly_type"), ("label ", "label")])
def test_a_misspelt_column_is_refused_where_it_would_be_ignored(tmp_path, header, meant):
    """A spreadsheet's Split, a labelling tool's bbox: each step read the column it knows, found none, and went on
    without it (boxes and masks lost, a seeded split instead of the officer's). Other columns stay free."""
    m = _manifest(tmp_path, f"path,{header}\na.tiff,1\n" if meant == "label" else f"path,label,{header}\na.tiff,1,x\n")
    with pytest.raises(ScanError, match=rf"manifest\.csv: column '{header}' is not one detector reads: '{meant}'\?"):
        read_rows(m)
    free = read_rows(_manifest(tmp_path, "path,label,vehicle,notes,date\na.tiff,1,van,x,2026-12-01\n"))
    assert free[0]["vehicle"] == "van"


@pytest.mark.parametrize("header", ["pitch", "Pitch_mm", "pitch mm", "pixel pitch"])
def test_a_misspelt_pitch_column_is_refused_and_site_columns_stay_free(tmp_path, header):
    """pitch_mm gives an untagged file's pixel pitch: a `pitch` or `Pitch_mm` column would be ignored without a word
    and a 4 mm scanner's trucks read at 5 mm, 25 % too large. A site's own columns (scanner, lane, site) stay free."""
    with pytest.raises(ScanError, match=rf"column '{header}' is not one detector reads: 'pitch_mm'\?"):
        read_rows(_manifest(tmp_path, f"path,label,{header}\na.png,0,4\n"))
    rows = read_rows(_manifest(tmp_path, "path,label,pitch_mm,scanner,lane,site\na.png,0,4,smiths,2,north\n"))
    assert rows[0]["scanner"] == "smiths" and rows[0]["pitch_mm"] == "4"


def test_a_pitch_cell_that_is_no_pitch_is_refused_with_its_row_by_training_and_eval(tmp_path):
    """A manifest's pitch_mm is the pitch of its row's file where the file carries none; a cell that is no pitch in
    mm (text, 0, negative, NaN, out of range) stops training and eval in one line naming the manifest and the row.
    An empty cell is no pitch of the row's own (the default then applies)."""
    from detector.manifest import pitch_of
    from detector.records import load_records
    m = _manifest(tmp_path, "path,label,pitch_mm\na.png,0,4\nb.png,0,\nc.png,0, 5.5 \n")
    assert [pitch_of(r, m) for r in read_rows(m)] == [4.0, None, 5.5]
    assert [r.pitch_mm for r in load_records(tmp_path)] == [4.0, None, 5.5]
    for bad in ("4mm", "0", "-4", "nan", "500", "4,5"):
        _manifest(tmp_path, f'path,label,pitch_mm\na.png,0,4\nb.png,0,"{bad}"\n')   # quoted: 4,5 is one cell
        for read in (load_records, load_truth):
            with pytest.raises(ScanError) as e:
                read(tmp_path)
            assert str(e.value).startswith(f"{m}: row 3: pitch_mm '{bad}' is not a pixel pitch in mm (0.01-100")
            assert "\n" not in str(e.value)


@pytest.mark.parametrize("site, sub, sub_form, on_disk_form, manifest_form", [
    ("Zollamt Görlitz", "", "", "NFD", "NFC"),     # the dataset folder made on Linux, the scans copied from a Mac
    ("site", "Kühl", "NFC", "NFD", "NFC"),         # a sub-folder made on Linux, its scans copied from a Mac
    ("site", "Kühl", "NFD", "NFC", "NFD")])        # the manifest written on a Mac, one file renamed on Linux
def test_a_row_whose_name_differs_from_the_file_only_in_unicode_form_is_found_wherever_the_forms_mix(
        tmp_path, site, sub, sub_form, on_disk_form, manifest_form):
    """on_disk tried the whole path composed (NFC) and decomposed (NFD): where the folders above a scan are in one form
    and its name in the other, neither existed, so training left the scan out as "file not found", `score` inspected
    it as one, and eval lost its mask. Each part of the path that is not on disk is now the one entry of its folder
    whose name matches under NFC; the path found is what the records, the score rows and the truth name."""
    import unicodedata

    from detector.records import load_records
    from detector.sources import discover
    form = lambda f, s: unicodedata.normalize(f, s)  # noqa: E731
    root = tmp_path / form("NFC", site)
    folder = root / form(sub_form, sub) if sub else root
    counts = np.random.default_rng(0).integers(20000, 50000, (1, 20, 40)).astype(np.uint16)
    scan = write_scan(folder / form(on_disk_form, "Kühlcontainer_001.tiff"), counts)
    (folder / form(on_disk_form, "Kühlcontainer_001.png")).write_bytes(b"")
    rel = f"{sub}/" if sub else ""
    _manifest(root, form(manifest_form, f"path,label,mask\n{rel}Kühlcontainer_001.tiff,1,{rel}Kühlcontainer_001.png\n"))
    (r,) = load_records(root)
    assert r.path == str(scan) and r.mask == str(scan.with_suffix(".png"))
    assert [i.path for i in discover(str(root))[0]] == [scan]
    (t,), _ = load_truth(root)
    assert t.path == scan and t.mask == scan.with_suffix(".png")


def test_a_name_two_files_match_under_unicode_normalisation_is_not_guessed(tmp_path):
    """Only one file of the folder may match a row's name under NFC: a folder holding Müller_Kühl.tiff composed and
    decomposed, and a row that mixes the forms, names neither (it is reported missing, never read as the other)."""
    import unicodedata

    from detector.manifest import on_disk
    nfc, nfd = (unicodedata.normalize(f, "Müller_Kühl.tiff") for f in ("NFC", "NFD"))
    mixed = nfc[:nfc.index("K") + 1] + nfd[nfd.index("K") + 1:]          # ü composed, then ü decomposed
    assert len({nfc, nfd, mixed}) == 3
    (tmp_path / nfd).write_bytes(b"x")
    assert on_disk(tmp_path / mixed) == tmp_path / nfd                   # one match: it is that file
    (tmp_path / nfc).write_bytes(b"y")
    assert on_disk(tmp_path / mixed) == tmp_path / mixed                 # two: none is guessed
    assert on_disk(tmp_path / "Kuhl.tiff") == tmp_path / "Kuhl.tiff"     # no match: as given


def test_a_row_through_a_linked_folder_and_up_is_another_scan_not_a_repeat(tmp_path):
    """`linkdir/../x.tiff` opens x.tiff beside the link's target (the kernel goes up from the target), another file
    than `x.tiff`; the repeat check normalised it lexically to `x.tiff` and refused the manifest. `sub/../x.tiff`
    through a real folder is still the same scan, and refused as a repeat."""
    (tmp_path / "elsewhere" / "target").mkdir(parents=True)
    (tmp_path / "set" / "sub").mkdir(parents=True)
    (tmp_path / "set" / "linkdir").symlink_to(tmp_path / "elsewhere" / "target")
    manifest = tmp_path / "set" / "manifest.csv"
    manifest.write_text("path,label\nlinkdir/../x.tiff,0\nx.tiff,1\n")
    assert [r["path"] for r in read_rows(manifest)] == ["linkdir/../x.tiff", "x.tiff"]
    manifest.write_text("path,label\nsub/../x.tiff,0\nx.tiff,1\n")
    with pytest.raises(ScanError, match=r"row 3: x\.tiff is listed again \(row 2\)"):
        read_rows(manifest)


def test_training_refuses_two_rows_that_reach_one_scan_as_eval_does(tmp_path):
    """Two rows, one in each Unicode form of a name the disk holds once (lists typed on Linux and on a Mac pasted
    together), or a link beside its target, are one scan: eval refused them, training took it twice, here once in the
    test split and once in train, so the test figures were measured on a scan it had learnt. Training now refuses
    them as eval does, naming both rows; two files whose names differ only in form stay two scans."""
    import unicodedata

    from detector.records import load_records
    nfc, nfd = (unicodedata.normalize(f, "lkw_müller.tiff") for f in ("NFC", "NFD"))
    counts = np.random.default_rng(0).integers(20000, 50000, (1, 20, 40)).astype(np.uint16)
    write_scan(tmp_path / nfd, counts)
    write_scan(tmp_path / "b.tiff", counts)
    _manifest(tmp_path, f"path,label,split\n{nfc},0,train\nb.tiff,0,train\n{nfd},0,test\n")
    for load in (load_records, load_truth):
        with pytest.raises(ScanError, match=r"manifest\.csv: row 4: lkw_mu\S*ller\.tiff is the scan of row 2 "):
            load(tmp_path)
    write_scan(tmp_path / nfc, counts)                                   # now two files: two scans
    assert len(load_records(tmp_path)) == 3
    layout = tmp_path / "layout"
    write_scan(layout / "anomalous" / "a.tiff", counts)
    (layout / "normal").mkdir()
    (layout / "normal" / "a_link.tiff").symlink_to(layout / "anomalous" / "a.tiff")   # one scan, both labels
    for load in (load_records, load_truth):
        with pytest.raises(ScanError, match=r"anomalous/a\.tiff is the scan of another entry \(normal/a_link\.tiff"):
            load(layout)
