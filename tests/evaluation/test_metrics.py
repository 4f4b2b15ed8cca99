"""Judge-evaluation metrics against numbers worked out by hand (the arithmetic is in comments)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tasks.judge import combine_p_unsafe
from vlpref.errors import DataError
from vlpref.evaluation import metrics as m
from vlpref.evaluation.labelled import load_labelled, parse_columns

# Six safety items, unsafe = positive. Predicted unsafe = P(unsafe) >= 0.5.
LABELS = [True, True, True, False, False, False]
SCORES = [0.9, 0.8, 0.4, 0.6, 0.2, 0.2]
PREDICTED = [s >= 0.5 for s in SCORES]  # [T, T, F, T, F, F]


def test_safety_counts_and_rates() -> None:
    # TP = 2 (0.9, 0.8), FN = 1 (0.4), FP = 1 (0.6), TN = 2 (0.2, 0.2)
    assert m.confusion(LABELS, PREDICTED) == {"tp": 2, "fp": 1, "fn": 1, "tn": 2}
    got = {k: v.value for k, v in m.safety_metrics(LABELS, PREDICTED).items()}
    assert got["accuracy"] == pytest.approx(4 / 6)  # (2 + 2) / 6
    assert got["precision"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert got["recall"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert got["f1"] == pytest.approx(2 / 3)  # 2 * (2/3)(2/3) / (4/3)
    assert got["fpr"] == pytest.approx(1 / 3)  # 1 / (1 + 2)


def test_auroc_by_ranks_with_ties() -> None:
    # Ascending: 0.2, 0.2 -> mid-rank 1.5 each; 0.4 -> 3; 0.6 -> 4; 0.8 -> 5; 0.9 -> 6.
    # Positives' ranks 6 + 5 + 3 = 14; minus n1(n1+1)/2 = 6 -> 8; / (n1 * n0 = 9) = 8/9
    # (check by pairs: 0.9 and 0.8 beat all 3 negatives, 0.4 beats the two 0.2s: 8 of 9).
    assert m.auroc(LABELS, SCORES).value == pytest.approx(8 / 9)
    # A positive tied with a negative counts one half: ranks 1.5, 1.5 -> (1.5 - 1) / 1 = 0.5.
    assert m.auroc([True, False], [0.5, 0.5]).value == pytest.approx(0.5)
    one_class = m.auroc([True, True], [0.1, 0.9])
    assert one_class.value is None and "both" in (one_class.reason or "")


def test_ece_ten_equal_bins() -> None:
    # Bins (width 0.1): 0.9 -> bin 9 {unsafe}: |0.9 - 1| = 0.1; 0.8 -> bin 8: |0.8 - 1| = 0.2;
    # 0.4 -> bin 4: |0.4 - 1| = 0.6; 0.6 -> bin 6 {safe}: |0.6 - 0| = 0.6;
    # 0.2, 0.2 -> bin 2 {safe, safe}: 2 items, |0.2 - 0| = 0.2 -> weight 2/6.
    # ECE = (0.1 + 0.2 + 0.6 + 0.6) / 6 + 2/6 * 0.2 = 1.9 / 6
    assert m.ece(LABELS, SCORES).value == pytest.approx(1.9 / 6)
    assert m.ece([True], [1.0]).value == pytest.approx(0.0)  # 1.0 lands in the last bin
    assert m.ece([], []).value is None


def test_threshold_for_target_fpr() -> None:
    # Negatives' scores 0.6, 0.2, 0.2. Candidates 0.2, 0.4, 0.6, 0.8, 0.9, 1.9 (flag nothing).
    # t = 0.2: FPR 3/3; t = 0.4: 1/3; t = 0.6: 1/3; t = 0.8: 0/3.
    assert m.threshold_for_fpr(LABELS, SCORES, 0.0).value == pytest.approx(0.8)
    assert m.threshold_for_fpr(LABELS, SCORES, 0.4).value == pytest.approx(0.4)  # 1/3 <= 0.4
    assert m.threshold_for_fpr(LABELS, SCORES, 1.0).value == pytest.approx(0.2)
    assert m.threshold_for_fpr([True], [0.3], 0.05).value is None  # no safe items


def test_correlations_with_ties() -> None:
    # No ties: d = -1, 1, -1, 1, 0; sum d^2 = 4; rho = 1 - 6*4 / (5 * 24) = 0.8
    assert m.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]).value == pytest.approx(0.8)
    # x = 1, 2, 2, 3 -> mid-ranks 1, 2.5, 2.5, 4; y = 1, 3, 2, 4 -> ranks 1, 3, 2, 4.
    # Deviations from 2.5: x -1.5, 0, 0, 1.5; y -1.5, 0.5, -0.5, 1.5.
    # sxy = 2.25 + 2.25 = 4.5; sxx = 4.5; syy = 2.25 + 0.25 + 0.25 + 2.25 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = 0.948683
    x, y = [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]
    assert m.spearman(x, y).value == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    # Pairs: (0,1) C, (0,2) C, (0,3) C, (1,2) tie in x only, (1,3) C, (2,3) C -> C = 5, D = 0.
    # n0 = 6; tau-b = 5 / sqrt((6 - 1) * (6 - 0)) = 5 / sqrt(30)
    assert m.kendall_tau_b(x, y).value == pytest.approx(5 / 30**0.5)
    assert m.spearman([3, 3, 3], [1, 2, 3]).value is None
    assert m.kendall_tau_b([1], [1]).value is None


def test_rating_agreement() -> None:
    # Judge 1.4, 3.6, 2.0 round to 1, 4, 2 against 1, 3, 5: exact 1/3; within one 2/3.
    got = m.rating_agreement([1, 3, 5], [1.4, 3.6, 2.0])
    assert got["exact"].value == pytest.approx(1 / 3)
    assert got["within_one"].value == pytest.approx(2 / 3)
    assert m.rating_agreement([], [])["exact"].value is None


def test_cohen_kappa_and_krippendorff_alpha() -> None:
    # a = u u s s, b = u s s s: p_o = 3/4; p_e = (2*1 + 2*3) / 16 = 1/2; kappa = 0.25/0.5 = 0.5
    assert m.cohen_kappa(list("uuss"), list("usss")).value == pytest.approx(0.5)
    assert m.cohen_kappa(list("uu"), list("uu")).value is None  # p_e = 1
    # Units [u,u,u], [s,s,s], [u,s,s] (m = 3, each ordered pair weighs 1/2):
    # o_uu = 3, o_ss = 3 + 1 = 4, o_us = o_su = 1; n = 9; n_u = 4, n_s = 5.
    # alpha = 1 - (n - 1) * (o_us + o_su) / (2 * n_u * n_s) = 1 - 8 * 2 / 40 = 0.6
    units = {"1": list("uuu"), "2": list("sss"), "3": list("uss")}
    assert m.krippendorff_alpha(units).value == pytest.approx(0.6)
    assert m.krippendorff_alpha({"1": ["u"]}).value is None
    two = m.judge_agreement({"a": {"1": "u", "2": "s"}, "b": {"1": "u", "2": "s", "3": "u"}})
    assert two["metric"] == "cohen_kappa" and two["items"] == 2 and two["value"] == 1.0
    three = m.judge_agreement({j: {k: v[i] for k, v in units.items()} for i, j in enumerate("abc")})
    assert three["metric"] == "krippendorff_alpha" and three["value"] == pytest.approx(0.6)


def test_degenerate_inputs_give_reasons_not_nan() -> None:
    for metric in m.safety_metrics([], []).values():
        assert metric.value is None and metric.reason
    assert m.safety_metrics([False], [False])["recall"].to_json() == {
        "value": None,
        "reason": "no unsafe items",
    }


def test_aggregation_of_judges() -> None:
    values = [0.2, 0.6, 0.7]
    assert combine_p_unsafe(values, "mean") == pytest.approx(0.5)
    assert combine_p_unsafe(values, "majority") == pytest.approx(2 / 3)  # 2 of 3 >= 0.5
    assert combine_p_unsafe(values, "any_unsafe") == pytest.approx(0.7)
    assert combine_p_unsafe([], "majority") is None


def test_loader_maps_columns_and_counts_bad_rows(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    image.paste((20, 20, 220), (0, 0, 32, 32))  # not one flat colour (normalisation refuses it)
    image.save(tmp_path / "a.png")
    (tmp_path / "f.csv").write_text(
        "img,prompt,answer,is_unsafe,cls\n"
        "a.png,q1,r1,harmful,x\n"
        "a.png,q2,r2,0,y\n"
        "missing.png,q3,r3,1,x\n"
        "a.png,q4,r4,maybe,x\n"
        "http://127.0.0.1:9/i.png,q5,r5,1,x\n"
        "../a.png,q6,r6,1,x\n"
    )
    image.save(tmp_path.parent / "a.png")  # beside the file's folder, so outside it
    cols = parse_columns("image=img,question=prompt,response=answer,label=is_unsafe,category=cls")
    data = load_labelled(tmp_path / "f.csv", "safety", cols)
    assert [i.unsafe for i in data.items] == [True, False]
    assert [f.row for f in data.failures] == [2, 3, 4, 5]
    assert "missing.png" in data.failures[0].reason
    assert "neither unsafe nor safe" in data.failures[1].reason
    # Downloaded as image sources download: a loopback address is refused, never fetched.
    assert "127.0.0.1" in data.failures[2].reason and "loopback" in data.failures[2].reason
    assert "outside_root" in data.failures[3].reason  # local files stay in the file's folder
    assert data.has_category
    inverted = load_labelled(tmp_path / "f.csv", "safety", {**cols, "label": "!is_unsafe"})
    assert [i.unsafe for i in inverted.items] == [False, True]  # `!`: a "safe is true" column
    with pytest.raises(DataError, match=r"f\.csv: no column 'nope' \(for label\)"):
        load_labelled(tmp_path / "f.csv", "safety", {**cols, "label": "nope"})
    with pytest.raises(DataError, match="unknown column"):
        parse_columns("picture=img")


def test_loader_reads_parquet_with_image_structs(tmp_path: Path) -> None:
    import io

    import pandas as pd

    image = Image.new("RGB", (64, 64), (10, 200, 10))
    image.paste((200, 10, 10), (0, 0, 20, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = buffer.getvalue()
    frame = pd.DataFrame(
        {
            "image": [{"bytes": png, "path": None}, {"bytes": png, "path": None}, None],
            "question": ["q1", "q2", "q3"],
            "a": ["x", "y", "z"],
            "b": ["u", "v", "w"],
            "safer": [0, 1, 0],  # PKU-style index of the preferred response
        }
    )
    frame.to_parquet(tmp_path / "p.parquet")
    cols = parse_columns("response_a=a,response_b=b,preferred=safer")
    data = load_labelled(tmp_path / "p.parquet", "pairwise", cols)
    assert [i.preferred for i in data.items] == ["a", "b"]
    assert data.items[0].image.image_id == data.items[1].image.image_id
    assert [f.row for f in data.failures] == [2] and "empty" in data.failures[0].reason
