"""`vlpref judge-eval`: the configured judges over a labelled file, then their metrics.

The items become the judge stage's own tables (questions, responses, images) and go through
`tasks.judge.judge_responses` -- the same prompts, protocols, output constraints, corrective
re-asks and parsers as a build -- with a journal under `<workspace>/journal/judge-eval/<file
sha256[:16]>`, so a rerun sends nothing and a changed prompt re-asks only its own calls. Pairwise
items are asked as given (both orders), not as pair selection would pick them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks.judge import TokenCount, judge_responses
from vlpref.config import RunConfig
from vlpref.evaluation import metrics as m
from vlpref.evaluation.labelled import Labelled, LabelledItem
from vlpref.records import stable_id
from vlpref.service import ModelService
from vlpref.workspace import Workspace

BRANCH = "judge-eval"


def _ids(labelled: Labelled, item: LabelledItem) -> tuple[str, str, str]:
    qid = stable_id(BRANCH, labelled.file_hash, item.row)
    return qid, stable_id(qid, "a"), stable_id(qid, "b")


def _eval_config(config: RunConfig, labelled: Labelled) -> RunConfig:
    stage = config.stages.judge
    update: dict[str, Any] = {
        "safety": labelled.kind == "safety",
        "aspects": labelled.aspects if labelled.kind == "rating" else (),
        "pairwise": False,  # pairwise items are passed as given
    }
    stages = config.stages.model_copy(update={"judge": stage.model_copy(update=update)})
    return config.model_copy(update={"stages": stages})


def tables(labelled: Labelled) -> tuple[pa.Table, pa.Table, pa.Table, dict[str, list[Any]]]:
    """-> (questions, responses, images, pairs) in the judge stage's shapes."""
    questions: list[dict[str, Any]] = []
    responses: list[dict[str, Any]] = []
    images: dict[str, dict[str, Any]] = {}
    pairs: dict[str, list[Any]] = {}
    for item in labelled.items:
        qid, ra, rb = _ids(labelled, item)
        image = item.image
        images[image.image_id] = {
            "image_id": image.image_id,
            "format": image.format,
            "bytes": image.data,
        }
        questions.append(
            {"question_id": qid, "text": item.question, "image_id": image.image_id, "caption": ""}
        )
        texts = [(ra, item.response_a), (rb, item.response_b)]
        if labelled.kind != "pairwise":
            texts = [(ra, item.response)]
        else:
            pairs[qid] = [(ra, rb)]
        for idx, (rid, text) in enumerate(texts):
            responses.append(
                {
                    "response_id": rid,
                    "question_id": qid,
                    "text": text,
                    "model": "labelled",
                    "sample_idx": idx,
                    "finish_reason": "stop",
                }
            )
    return (
        pa.Table.from_pylist(questions),
        pa.Table.from_pylist(responses),
        pa.Table.from_pylist(list(images.values())),
        pairs,
    )


_REFINE_COUNTS = ("rule_calls", "prior_calls", "cascaded", "rules_missing")


def _rules(config: RunConfig, labelled: Labelled) -> dict[str, tuple[str, ...]]:
    """question_id -> the rules a judge with `rules` on asks: those of the taxonomy node the
    item's `category` names (by path or name; `Taxonomy.rules_for`), else the top level's."""
    if not any(j.rules != "off" for j in config.judges):
        return {}
    from vlpref.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(config.taxonomy)
    return {_ids(labelled, item)[0]: taxonomy.rules_for(item.category) for item in labelled.items}


def evaluate(
    config: RunConfig,
    labelled: Labelled,
    *,
    target_fpr: float = 0.05,
    service: ModelService | None = None,
) -> dict[str, Any]:
    """Ask the judges (journaled) and return the report as JSON-ready data."""
    cfg = _eval_config(config, labelled)
    questions, responses, images, pairs = tables(labelled)
    rules = _rules(cfg, labelled)
    tokens = TokenCount()
    journal = Workspace(cfg.workspace).journal(BRANCH, labelled.file_hash[:16])
    with journal:
        out = judge_responses(
            BRANCH,
            questions,
            responses,
            images,
            cfg,
            journal,
            service,
            pairs=pairs if labelled.kind == "pairwise" else None,
            tokens=tokens,
            rules=rules,
        )
    rows = out.rows.to_pylist()
    n = len(labelled.items)
    report: dict[str, Any] = {
        "file": str(labelled.path),
        "file_sha256": labelled.file_hash,
        "kind": labelled.kind,
        "config": cfg.name,
        "judges": [j.name for j in cfg.judges],
        "aggregate": cfg.stages.judge.aggregate,
        "items": n,
        "rows_failed": len(labelled.failures),
        "row_failures": [{"row": f.row, "reason": f.reason} for f in labelled.failures],
        "judge_calls_failed": out.n_failed,
        "judge_failures": [
            {"call": f.item_id, "kind": f.kind, "reason": f.reason} for f in out.failures[:50]
        ],
        "cost": {
            "judge_calls": out.n_in,
            "requests_sent": out.extra["requests_sent"],
            "requests_from_journal": out.extra["requests_cached"],
            "prompt_tokens": tokens.prompt,
            "completion_tokens": tokens.completion,
            "judge_calls_per_item": out.n_in / n if n else None,
            "tokens_per_item": (tokens.prompt + tokens.completion) / n if n else None,
            # The refinement phases' own calls (included in judge_calls): rules, priors, cascade.
            **{k: out.extra[k] for k in _REFINE_COUNTS if k in out.extra},
        },
    }
    if any(j.rules != "off" for j in cfg.judges):
        report["rules"] = {
            "items_with_rules": sum(
                1 for q in questions.column("question_id").to_pylist() if rules.get(q)
            ),
            "distinct_rules": len({r for rs in rules.values() for r in rs}),
            "combine": {j.name: j.rules for j in cfg.judges if j.rules != "off"},
        }
    by_judge: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_judge[r["judge"]].append(r)
    items = {_ids(labelled, i)[0]: i for i in labelled.items}
    if labelled.kind == "safety":
        results = {
            j: _grouped(items, _safety_scores(by_judge[j]), labelled, _safety_group(target_fpr))
            for j in report["judges"]
        }
        if len(report["judges"]) > 1:
            combined = _combined_safety(rows, cfg.stages.judge.aggregate)
            name = f"combined ({cfg.stages.judge.aggregate})"
            results[name] = _grouped(items, combined, labelled, _safety_group(target_fpr))
        report["target_fpr"] = target_fpr
        verdicts = {
            j: {
                r["question_id"]: r["verdict"]
                for r in by_judge[j]
                if r["kind"] == "safety" and r["verdict"]
            }
            for j in report["judges"]
        }
        report["judge_agreement"] = m.judge_agreement(verdicts)
        if labelled.has_category and len(report["judges"]) > 1:
            by_category: dict[str, set[str]] = defaultdict(set)
            for qid, item in items.items():
                by_category[item.category or "(none)"].add(qid)
            report["judge_agreement_by_category"] = {
                c: m.judge_agreement(
                    {j: {q: v for q, v in vs.items() if q in qids} for j, vs in verdicts.items()}
                )
                for c, qids in sorted(by_category.items())
            }
    elif labelled.kind == "pairwise":
        results = {
            j: _grouped(items, _pair_picks(by_judge[j], items, labelled), labelled, _pair_group)
            for j in report["judges"]
        }
    else:
        results = {
            j: _grouped(items, _ratings(by_judge[j]), labelled, _rating_group(labelled.aspects))
            for j in report["judges"]
        }
    report["results"] = results
    return report


# --- per-kind scoring: question_id -> what the judge said ------------------------------------


def _safety_scores(rows: Iterable[Mapping[str, Any]]) -> dict[str, tuple[bool, float]]:
    return {
        r["question_id"]: (r["verdict"] == "unsafe", float(r["score"]))
        for r in rows
        if r["kind"] == "safety" and r["score"] is not None
    }


def _combined_safety(rows: Iterable[Mapping[str, Any]], aggregate: str) -> dict[str, Any]:
    from tasks.judge import combine_p_unsafe

    scores: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "safety" and r["score"] is not None:
            scores[r["question_id"]].append(float(r["score"]))
    out: dict[str, tuple[bool, float]] = {}
    for qid, values in scores.items():
        p = combine_p_unsafe(values, aggregate)
        if p is not None:
            out[qid] = (p > 0.5 if aggregate == "majority" else p >= 0.5, p)
    return out


def _pair_picks(
    rows: Iterable[Mapping[str, Any]], items: Mapping[str, LabelledItem], labelled: Labelled
) -> dict[str, tuple[str | None, str | None]]:
    """question_id -> (pick with a shown first, pick with b shown first), each a | b | None."""
    picks: dict[str, list[str | None]] = defaultdict(lambda: [None, None])
    for r in rows:
        if r["kind"] != "pairwise":
            continue
        qid = r["question_id"]
        _, ra, _ = _ids(labelled, items[qid])
        first_is_a = r["response_id"] == ra
        first_wins = r["verdict"] == "A"
        pick = "a" if first_wins == first_is_a else "b"
        picks[qid][0 if first_is_a else 1] = pick
    return {q: (p[0], p[1]) for q, p in picks.items()}


def _ratings(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["kind"] == "rating" and r["score"] is not None:
            out[r["question_id"]][r["aspect"]] = float(r["score"])
    return out


# --- metrics per group --------------------------------------------------------------------------

Group = Callable[[Sequence[LabelledItem], Mapping[str, Any], Sequence[str]], dict[str, Any]]


def _grouped(
    items: Mapping[str, LabelledItem], judged: Mapping[str, Any], labelled: Labelled, group: Group
) -> dict[str, Any]:
    qids = list(items)
    out: dict[str, Any] = {"overall": group([items[q] for q in qids], judged, qids)}
    if labelled.has_category:
        cats: dict[str, list[str]] = defaultdict(list)
        for q in qids:
            cats[items[q].category or "(none)"].append(q)
        out["by_category"] = {
            c: group([items[q] for q in qs], judged, qs) for c, qs in sorted(cats.items())
        }
    return out


def _safety_group(target_fpr: float) -> Group:
    def group(
        items: Sequence[LabelledItem], judged: Mapping[str, Any], qids: Sequence[str]
    ) -> dict[str, Any]:
        pairs = [
            (bool(i.unsafe), judged[q]) for i, q in zip(items, qids, strict=True) if q in judged
        ]
        labels = [y for y, _ in pairs]
        predicted = [v[0] for _, v in pairs]
        scores = [v[1] for _, v in pairs]
        out: dict[str, Any] = {
            "n": len(items),
            "judged": len(pairs),
            "unsafe": sum(labels),
            **m.confusion(labels, predicted),
        }
        metrics = {
            **m.safety_metrics(labels, predicted),
            "auroc": m.auroc(labels, scores),
            "ece": m.ece(labels, scores),
            "threshold_at_target_fpr": m.threshold_for_fpr(labels, scores, target_fpr),
        }
        out.update({k: v.to_json() for k, v in metrics.items()})
        return out

    return group


def _pair_group(
    items: Sequence[LabelledItem], judged: Mapping[str, Any], qids: Sequence[str]
) -> dict[str, Any]:
    both = [(i, judged[q]) for i, q in zip(items, qids, strict=True) if q in judged]
    complete = [(i, p) for i, p in both if p[0] is not None and p[1] is not None]
    consistent = [(i, p) for i, p in complete if p[0] == p[1]]
    agree = sum(1 for i, p in complete if (p[0] if p[0] == p[1] else "tie") == i.preferred)
    n = len(complete)
    return {
        "n": len(items),
        "judged": n,
        "human_ties": sum(1 for i in items if i.preferred == "tie"),
        "agreement": m.ratio(agree, n, "no item judged in both orders").to_json(),
        "position_consistency": m.ratio(
            len(consistent), n, "no item judged in both orders"
        ).to_json(),
        "tie_rate": m.ratio(n - len(consistent), n, "no item judged in both orders").to_json(),
    }


def _rating_group(aspects: Sequence[str]) -> Group:
    def group(
        items: Sequence[LabelledItem], judged: Mapping[str, Any], qids: Sequence[str]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(items)}
        for a in aspects:
            pairs = [
                (i.ratings[a], judged[q][a])
                for i, q in zip(items, qids, strict=True)
                if a in judged.get(q, {})
            ]
            human = [h for h, _ in pairs]
            judge = [j for _, j in pairs]
            res = {
                "spearman": m.spearman(human, judge),
                "kendall_tau_b": m.kendall_tau_b(human, judge),
                **m.rating_agreement(human, judge),
            }
            out[a] = {"judged": len(pairs), **{k: v.to_json() for k, v in res.items()}}
        return out

    return group


# --- output -------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown(report: Mapping[str, Any]) -> str:
    cost = report["cost"]
    lines = [
        f"# Judge evaluation: {Path(report['file']).name}",
        "",
        f"- kind: {report['kind']}; config: {report['config']}; "
        f"judges: {', '.join(report['judges'])}",
        f"- items: {report['items']} (rows that could not be used: {report['rows_failed']}); "
        f"judge calls failed: {report['judge_calls_failed']}",
        f"- cost: {cost['judge_calls']} judge calls ({cost['requests_sent']} sent, "
        f"{cost['requests_from_journal']} from the journal), {cost['prompt_tokens']} prompt + "
        f"{cost['completion_tokens']} completion tokens; per item: "
        f"{_cell(cost['judge_calls_per_item'])} calls, {_cell(cost['tokens_per_item'])} tokens",
    ]
    phases = [f"{cost[k]} {k.replace('_', ' ')}" for k in _REFINE_COUNTS if cost.get(k)]
    if phases:
        lines.append(f"- of which refinement: {', '.join(phases)}")
    if "rules" in report:
        r = report["rules"]
        lines.append(
            f"- rules: {r['items_with_rules']} of {report['items']} items have rules "
            f"({r['distinct_rules']} distinct); combined by "
            + ", ".join(f"{j}: {how}" for j, how in r["combine"].items())
        )
    if "target_fpr" in report:
        lines.append(f"- threshold column: P(unsafe) threshold at FPR <= {report['target_fpr']}")
    if "judge_agreement" in report:
        ag = report["judge_agreement"]
        value = _cell(ag["value"]) if ag["value"] is not None else f"n/a ({ag.get('reason')})"
        lines.append(f"- agreement between judges ({ag['metric'] or '-'}): {value}")
        for category, cat in report.get("judge_agreement_by_category", {}).items():
            shown = (
                _cell(cat["value"]) if cat["value"] is not None else f"n/a ({cat.get('reason')})"
            )
            lines.append(f"  - {category}: {shown}")
    for judge, res in report["results"].items():
        groups = {"overall": res["overall"], **res.get("by_category", {})}
        first = next(iter(groups.values()))
        if report["kind"] == "rating":
            cols = ["aspect", "judged", "spearman", "kendall_tau_b", "exact", "within_one"]
            lines += ["", f"## {judge}", "", "| group | " + " | ".join(cols) + " |"]
            lines.append("|" + "---|" * (len(cols) + 1))
            for name, g in groups.items():
                for aspect in (k for k in g if k != "n"):
                    row = [aspect, *(_cell(g[aspect][c]) for c in cols[1:])]
                    lines.append(f"| {name} | " + " | ".join(row) + " |")
            continue
        cols = list(first)
        lines += ["", f"## {judge}", "", "| group | " + " | ".join(cols) + " |"]
        lines.append("|" + "---|" * (len(cols) + 1))
        for name, g in groups.items():
            lines.append(f"| {name} | " + " | ".join(_cell(g[c]) for c in cols) + " |")
    if report["row_failures"]:
        lines += ["", "## Rows not used", ""]
        lines += [f"- row {f['row']}: {f['reason']}" for f in report["row_failures"][:50]]
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    md.write_text(markdown(report), encoding="utf-8")
    js.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return md, js
