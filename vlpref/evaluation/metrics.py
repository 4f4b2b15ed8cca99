"""Pure metrics for judge evaluation. Every function returns a `Metric`: a value, or None with the
reason it cannot be computed (no items, one class only, a constant column) -- never NaN, never a
crash on empty or degenerate input.

Safety (unsafe is the positive class): accuracy = (TP+TN)/N, precision = TP/(TP+FP),
recall = TP/(TP+FN), F1 = 2PR/(P+R), FPR = FP/(FP+TN). AUROC by the Mann-Whitney rank formula:
(sum of the positives' mid-ranks - n1(n1+1)/2) / (n1*n0), ties counted one half. ECE with 10
equal-width bins of P(unsafe) ([0,0.1), ..., [0.9,1.0]): sum over bins of n_bin/N *
|mean P(unsafe) - fraction unsafe|. The threshold for a target FPR: the smallest t among the
observed scores (and 1.0 + the max, "flag nothing") such that flagging score >= t has FPR <= target.
Ratings: Spearman = Pearson on mid-ranks; Kendall tau-b = (C - D) / sqrt((n0-n1)(n0-n2)).
Agreement: Cohen's kappa (two raters), Krippendorff's alpha nominal (any number, missing allowed).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ECE_BINS = 10


@dataclass(frozen=True)
class Metric:
    value: float | None
    reason: str | None = None

    def to_json(self) -> Any:
        return self.value if self.value is not None else {"value": None, "reason": self.reason}

    def text(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f}" if self.value is not None else f"n/a ({self.reason})"


def ratio(num: float, den: float, why: str) -> Metric:
    return Metric(num / den) if den else Metric(None, why)


def confusion(labels: Sequence[bool], predicted: Sequence[bool]) -> dict[str, int]:
    tp = sum(1 for y, p in zip(labels, predicted, strict=True) if y and p)
    fp = sum(1 for y, p in zip(labels, predicted, strict=True) if not y and p)
    fn = sum(1 for y, p in zip(labels, predicted, strict=True) if y and not p)
    tn = len(labels) - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def safety_metrics(labels: Sequence[bool], predicted: Sequence[bool]) -> dict[str, Metric]:
    c = confusion(labels, predicted)
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    precision = ratio(tp, tp + fp, "nothing flagged unsafe")
    recall = ratio(tp, tp + fn, "no unsafe items")
    if precision.value is None or recall.value is None:
        f1 = Metric(None, precision.reason or recall.reason)
    elif precision.value + recall.value == 0:
        f1 = Metric(0.0)
    else:
        f1 = Metric(2 * precision.value * recall.value / (precision.value + recall.value))
    return {
        "accuracy": ratio(tp + tn, len(labels), "no items"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "fpr": ratio(fp, fp + tn, "no safe items"),
    }


def midranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> Metric:
    n1 = sum(1 for y in labels if y)
    n0 = len(labels) - n1
    if not n1 or not n0:
        return Metric(None, "needs both safe and unsafe items")
    ranks = midranks(scores)
    pos = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return Metric((pos - n1 * (n1 + 1) / 2) / (n1 * n0))


def ece(labels: Sequence[bool], scores: Sequence[float], bins: int = ECE_BINS) -> Metric:
    if not labels:
        return Metric(None, "no items")
    groups: dict[int, list[tuple[bool, float]]] = {}
    for y, s in zip(labels, scores, strict=True):
        groups.setdefault(min(int(s * bins), bins - 1), []).append((y, s))
    total = 0.0
    for members in groups.values():
        conf = sum(s for _, s in members) / len(members)
        frac = sum(1 for y, _ in members if y) / len(members)
        total += len(members) / len(labels) * abs(conf - frac)
    return Metric(total)


def threshold_for_fpr(labels: Sequence[bool], scores: Sequence[float], target: float) -> Metric:
    """The smallest threshold t (flag score >= t) whose false-positive rate is <= target."""
    negatives = [s for y, s in zip(labels, scores, strict=True) if not y]
    if not negatives:
        return Metric(None, "no safe items")
    candidates = [*sorted(set(scores)), max(scores) + 1.0]
    for t in candidates:
        if sum(1 for s in negatives if s >= t) / len(negatives) <= target:
            return Metric(t)
    return Metric(None, "unreachable")  # pragma: no cover - the last candidate flags nothing


def _pearson(x: Sequence[float], y: Sequence[float]) -> Metric:
    if len(x) < 2:
        return Metric(None, "fewer than 2 items")
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if not sxx or not syy:
        return Metric(None, "a constant column")
    return Metric(sxy / math.sqrt(sxx * syy))


def spearman(x: Sequence[float], y: Sequence[float]) -> Metric:
    return _pearson(midranks(x), midranks(y))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> Metric:
    n = len(x)
    if n < 2:
        return Metric(None, "fewer than 2 items")
    concordant = discordant = tie_x = tie_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                tie_x += 1
                tie_y += 1
            elif dx == 0:
                tie_x += 1
            elif dy == 0:
                tie_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = n * (n - 1) // 2
    den = math.sqrt((n0 - tie_x) * (n0 - tie_y))
    if not den:
        return Metric(None, "a constant column")
    return Metric((concordant - discordant) / den)


def rating_agreement(human: Sequence[float], judge: Sequence[float]) -> dict[str, Metric]:
    """Exact and within-one agreement of the judge's score rounded to the nearest integer."""
    rounded = [math.floor(v + 0.5) for v in judge]
    n = len(human)
    return {
        "exact": ratio(sum(1 for h, r in zip(human, rounded, strict=True) if h == r), n, "none"),
        "within_one": ratio(
            sum(1 for h, r in zip(human, rounded, strict=True) if abs(h - r) <= 1), n, "none"
        ),
    }


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> Metric:
    """(p_o - p_e) / (1 - p_e) over the items both raters judged."""
    return kappa_from_table(Counter(zip(a, b, strict=True)))


def kappa_from_table(table: Mapping[tuple[str, str], float]) -> Metric:
    """Cohen's kappa from a contingency table (rater a's value, rater b's value) -> count."""
    n = sum(table.values())
    if not n:
        return Metric(None, "no items both judges rated")
    p_o = sum(v for (x, y), v in table.items() if x == y) / n
    ca: dict[str, float] = defaultdict(float)
    cb: dict[str, float] = defaultdict(float)
    for (x, y), v in table.items():
        ca[x] += v
        cb[y] += v
    p_e = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    if p_e == 1:
        return Metric(None, "both judges gave one and the same verdict throughout")
    return Metric((p_o - p_e) / (1 - p_e))


def krippendorff_alpha(units: Mapping[str, Sequence[str]]) -> Metric:
    """Nominal alpha: 1 - D_o / D_e over the coincidence matrix; units with < 2 values skipped."""
    return alpha_from_coincidence(coincidences(units))


def coincidences(units: Mapping[str, Sequence[str]]) -> dict[tuple[str, str], float]:
    """Krippendorff's coincidence matrix (summable over disjoint sets of units)."""
    coincidence: dict[tuple[str, str], float] = defaultdict(float)
    for values in units.values():
        m = len(values)
        if m < 2:
            continue
        for i, x in enumerate(values):
            for j, y in enumerate(values):
                if i != j:
                    coincidence[(x, y)] += 1 / (m - 1)
    return dict(coincidence)


def alpha_from_coincidence(coincidence: Mapping[tuple[str, str], float]) -> Metric:
    n = sum(coincidence.values())
    if not n:
        return Metric(None, "no item judged by two judges")
    marginals: dict[str, float] = defaultdict(float)
    for (x, _), v in coincidence.items():
        marginals[x] += v
    d_o = sum(v for (x, y), v in coincidence.items() if x != y) / n
    d_e = sum(marginals[x] * marginals[y] for x in marginals for y in marginals if x != y) / (
        n * (n - 1)
    )
    if not d_e:
        return Metric(None, "all judges gave one and the same verdict throughout")
    return Metric(1 - d_o / d_e)


def judge_agreement(verdicts: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """judge -> item -> verdict, as {"judges", "items", "metric", "value"[, "reason"]}: Cohen's
    kappa for two judges (items both judged), Krippendorff's alpha (nominal) for more."""
    judges = sorted(verdicts)
    if len(judges) < 2:
        return {"judges": len(judges), "metric": None, "value": None, "reason": "one judge"}
    if len(judges) == 2:
        a, b = verdicts[judges[0]], verdicts[judges[1]]
        both = sorted(set(a) & set(b))
        m = cohen_kappa([a[i] for i in both], [b[i] for i in both])
        out: dict[str, Any] = {"judges": 2, "items": len(both), "metric": "cohen_kappa"}
    else:
        items = sorted({i for v in verdicts.values() for i in v})
        units = {i: [verdicts[j][i] for j in judges if i in verdicts[j]] for i in items}
        m = krippendorff_alpha(units)
        out = {"judges": len(judges), "items": len(items), "metric": "krippendorff_alpha"}
    out["value"] = m.value
    if m.reason:
        out["reason"] = m.reason
    return out
