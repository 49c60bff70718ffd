"""Sweep summary: one table (CSV and Markdown) and one plot per Hydra multirun.

`SweepSummary` is a Hydra callback (registered in conf/config.yaml under `hydra.callbacks`): when a
multirun ends, in the launching process, it reads every job's run.json in the sweep folder and writes

    <sweep dir>/summary.csv   one row per job: overrides (the swept keys also as their own columns),
                              per stage status and seconds, verify metrics, detections, graph nodes,
                              engine path (when a stage produced one), run folder
    <sweep dir>/summary.md    the same as a Markdown table, with per-stage built/hit counts on top
    <sweep dir>/summary.png   the swept key against the verify metrics (matplotlib, Agg backend)

It works for any launcher (basic, joblib, submitit): it only reads files. `d2build summarize
SWEEP_DIR` regenerates the three files from the same run.json files. A job that died before
writing run.json (killed, out of memory) still gets a row, with status `no run.json`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("d2build")

CSV_NAME, MD_NAME, PNG_NAME = "summary.csv", "summary.md", "summary.png"
# verify metrics shown in the table and plotted: column -> label
METRICS = {
    "min_recovered": "recovered (min over images)",
    "mean_box_iou": "mean box IoU",
    "mean_mask_iou": "mean mask IoU",
    "max_score_diff": "max |score difference|",
    "detections": "graph detections (all images)",
}
# eval metrics (when the jobs ran the eval stage): what a user sweeps NMS thresholds for
EVAL_METRICS = {
    "box_AP": "box AP",
    "box_AP50": "box AP50",
    "box_AR100": "box AR100",
    "mask_AP": "mask AP",
    "keypoint_AP": "keypoint AP",
    "dets_per_image": "detections per image",
    "box_AP_vs_detectron2": "box AP - Detectron2's",
}
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

_STATUS_ORDER = ["built", "hit", "skipped", "failed", "-", "no run.json"]

#: A file the jobs of one `d2build` command append their failures to, one line each: jobs in its process, in
#: joblib's or submitit's (they inherit the environment), and the jobs the sweep summary finds dead without a
#: run.json. cli.run creates it, reads it for the exit status and removes it.
FAILED_JOBS_ENV = "D2BUILD_FAILED_JOBS"


def record_failure(job: str) -> None:
    path = os.environ.get(FAILED_JOBS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(job.replace("\n", " ") + "\n")


@dataclass
class Summary:
    sweep_dir: Path
    rows: list[dict[str, Any]]
    swept: list[str]
    common: list[str]
    stages: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [r["job"] for r in self.rows if not r["ok"]]

    def counts_line(self) -> str:
        parts = []
        for stage in self.stages:
            c = self.counts.get(stage, {})
            order = sorted(c, key=lambda s: (_STATUS_ORDER.index(s) if s in _STATUS_ORDER else len(_STATUS_ORDER), s))
            parts.append(f"{stage}: " + ", ".join(f"{c[s]} {s}" for s in order))
        return "; ".join(parts)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write the sweep summary into the sweep folder."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            summary = write_summary(sweep_dir)
        except Exception as e:  # noqa: BLE001 - a summary problem must not hide the jobs' own results
            log.error("sweep summary: could not write it into %s (%s: %s); rerun `d2build summarize %s`",
                      sweep_dir, type(e).__name__, e, sweep_dir)
            return
        for job in summary.failed:  # the exit status counts jobs that died without saying so, too
            record_failure(job)
        log.info("sweep: %d job(s), %d failed; %s", len(summary.rows), len(summary.failed), summary.counts_line())
        log.info("sweep summary: %s", ", ".join(str(f) for f in summary.files))


# ---------------------------------------------------------------- reading the jobs

def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders under a sweep folder: those with run.json or Hydra's .hydra/overrides.yaml."""
    found = {p.parent for p in sweep_dir.rglob("run.json")}
    found |= {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    found.discard(sweep_dir)

    def order(d: Path) -> tuple:
        rel = d.relative_to(sweep_dir).parts
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in rel)

    return sorted(found, key=order)


def _load_job(d: Path) -> tuple[list[str], dict[str, Any] | None]:
    rj = d / "run.json"
    if rj.is_file():
        try:
            run = json.loads(rj.read_text())
            return list(run.get("overrides", [])), run
        except ValueError:
            pass
    overrides: list[str] = []
    ov = d / ".hydra" / "overrides.yaml"
    if ov.is_file():
        from omegaconf import OmegaConf

        overrides = [str(x) for x in OmegaConf.load(ov)]
    return overrides, None


def _split(override: str) -> tuple[str, str]:
    k, _, v = override.partition("=")
    return k.lstrip("+~"), v


def collect(sweep_dir: Path) -> Summary:
    sweep_dir = Path(sweep_dir)
    jobs = [(d, *_load_job(d)) for d in job_dirs(sweep_dir)]
    keys: list[str] = []
    values: dict[str, set[str]] = {}
    for _, overrides, _ in jobs:
        for o in overrides:
            k, v = _split(o)
            if k not in values:
                keys.append(k)
                values[k] = set()
            values[k].add(v)
    present = [{_split(o)[0] for o in ov} for _, ov, _ in jobs]
    swept = [k for k in keys if len(values[k]) > 1 or not all(k in p for p in present)]
    common = [f"{k}={next(iter(values[k]))}" for k in keys if k not in swept]
    stages: list[str] = []
    for _, _, run in jobs:
        for s in (run or {}).get("stages", {}):
            if s not in stages:
                stages.append(s)

    rows, counts = [], {s: {} for s in stages}
    for d, overrides, run in jobs:
        ov = dict(_split(o) for o in overrides)
        row: dict[str, Any] = {"job": d.relative_to(sweep_dir).as_posix()}
        row.update({k: ov.get(k, "") for k in swept})
        row["overrides"] = " ".join(overrides)
        st = (run or {}).get("stages", {})
        row["ok"] = bool(run and run.get("ok"))
        for s in stages:
            r = st.get(s)
            status = r["status"] if r else ("-" if run else "no run.json")
            row[f"{s}_status"] = status  # not `s`: a swept group (precision=...) may share a stage's name
            row[f"{s}_s"] = round(float(r["seconds"]), 2) if r else None
            counts[s][status] = counts[s].get(status, 0) + 1
        row.update(_metrics(st))
        row["run_dir"] = str(d)
        rows.append(row)
    return Summary(sweep_dir, rows, swept, common, stages, counts)


def _metrics(stages: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: None for k in (*METRICS, *EVAL_METRICS)}
    out.update(images=None, graph_nodes=None, engine=None)
    ev = ((stages.get("eval") or {}).get("info") or {})
    graph = (ev.get("metrics") or {}).get("graph") or {}
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask"), ("keypoints", "keypoint")):
        m = graph.get(iou_type) or {}
        for stat in ("AP", "AP50", "AR100"):
            if f"{prefix}_{stat}" in EVAL_METRICS and stat in m:
                out[f"{prefix}_{stat}"] = round(100 * m[stat], 3)
    if ev:
        out["dets_per_image"] = round(ev["detections_per_image"]["graph"], 2)
        out["box_AP_vs_detectron2"] = round(100 * ev["delta_ap"]["bbox"], 3)
    verify = (stages.get("verify") or {}).get("info") or {}
    summ = verify.get("summary") or {}
    for k in ("min_recovered", "mean_box_iou", "mean_mask_iou", "max_score_diff"):
        out[k] = summ.get(k)
    images = verify.get("images") or []
    if images:
        out["images"] = len(images)
        out["detections"] = sum(int(r.get("graph", 0)) for r in images)
    surgery = (stages.get("surgery") or {}).get("info") or {}
    out["graph_nodes"] = surgery.get("nodes")
    for r in stages.values():  # the engine, from whichever stage made one (the build stage)
        info = r.get("info") or {}
        if isinstance(info.get("engine"), str):
            out["engine"] = info["engine"] if Path(info["engine"]).is_absolute() or not r.get("dir") else \
                str(Path(r["dir"]) / info["engine"])
        for name in r.get("artifacts") or []:
            if name.endswith(ENGINE_SUFFIXES) and r.get("dir"):
                out["engine"] = str(Path(r["dir"]) / name)
    return out


# ---------------------------------------------------------------- writing

def columns(summary: Summary) -> list[str]:
    cols = ["job", *summary.swept, "ok"]
    for s in summary.stages:
        cols += [f"{s}_status", f"{s}_s"]
    evals = [k for k in EVAL_METRICS if any(r.get(k) is not None for r in summary.rows)]
    cols += [*METRICS, *evals, "images", "graph_nodes", "engine", "overrides", "run_dir"]
    return cols


def to_csv(summary: Summary) -> str:
    buf = io.StringIO()
    cols = columns(summary)
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in summary.rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()


def _fmt(v: Any, col: str) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        if col.endswith("_s"):
            return f"{v:.1f}"
        if col == "max_score_diff":
            return f"{v:.2e}"
        if col in EVAL_METRICS:
            return f"{v:.2f}"
        return f"{v:.4f}"
    return str(v).replace("|", "\\|")


def to_markdown(summary: Summary) -> str:
    cols = [c for c in columns(summary) if c not in ("overrides", "run_dir")]
    if not any(r.get("engine") for r in summary.rows):
        cols.remove("engine")
    lines = [f"# Sweep summary: {summary.sweep_dir}", ""]
    lines.append(f"{len(summary.rows)} job(s), {len(summary.failed)} failed. "
                 f"Swept: {', '.join(summary.swept) or '(nothing)'}.")
    if summary.common:
        lines.append(f"Common overrides: `{' '.join(summary.common)}`.")
    lines += ["", "Per stage: " + summary.counts_line() + ".", ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" if c in ("job", *summary.swept) or c.endswith("_status") else "---:"
                                for c in cols) + "|")
    for r in summary.rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), c) for c in cols) + " |")
    lines += ["", f"Per stage: `STAGE_status` (`built`, `hit`, `skipped`, `failed`) and `STAGE_s` seconds (for a "
              "hit: looking it up, or waiting while another job built it). Metrics from verify: "
              "min share of Detectron2's detections recovered, mean box and mask IoU of matched pairs, max "
              "score difference, detections of the graph over all verify images. From eval (when the jobs "
              "ran it): the graph's COCO AP/AP50/AR100 in points on the eval images, detections per image, "
              "and the graph's box AP minus Detectron2's at the same settings. Plot: "
              f"[{PNG_NAME}]({PNG_NAME}); CSV with full overrides and run folders: [{CSV_NAME}]({CSV_NAME})."]
    return "\n".join(lines) + "\n"


def _number(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def plot(summary: Summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary.rows
    numeric = [k for k in summary.swept if all(_number(r.get(k)) is not None for r in rows)]
    xkey = numeric[0] if numeric else (summary.swept[0] if summary.swept else None)
    others = [k for k in summary.swept if k != xkey]
    if xkey is None:
        xs = {r["job"]: i for i, r in enumerate(rows)}
        xlabel, ticks = "job", None
    elif xkey in numeric:
        xs = {r["job"]: _number(r[xkey]) for r in rows}
        xlabel, ticks = xkey, None
    else:
        cats = list(dict.fromkeys(str(r[xkey]) for r in rows))
        xs = {r["job"]: cats.index(str(r[xkey])) for r in rows}
        xlabel, ticks = xkey, cats
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = ", ".join(f"{k}={r[k]}" for k in others) or "jobs"
        series.setdefault(label, []).append(r)

    evals = {k: v for k, v in EVAL_METRICS.items() if any(_number(r.get(k)) is not None for r in rows)}
    shown = evals if evals else METRICS  # with eval: AP and recall per variant; else verify's agreement
    fig, axes = plt.subplots(len(shown), 1, figsize=(7.5, 2.0 * len(shown) + 0.8), sharex=True)
    for ax, (metric, label) in zip(axes, shown.items()):
        any_point = False
        for name, rs in series.items():
            pts = sorted((xs[r["job"]], _number(r.get(metric))) for r in rs if _number(r.get(metric)) is not None)
            if pts:
                any_point = True
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, alpha=0.3)
        if not any_point:
            ax.text(0.5, 0.5, "no verify metrics (verify did not run or failed)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="gray")
        ax.ticklabel_format(axis="y", useOffset=False, style="plain") if metric != "max_score_diff" else None
    if len(series) > 1 or others:
        axes[0].legend(fontsize=7, loc="best")
    axes[-1].set_xlabel(xlabel)
    if ticks is not None:
        axes[-1].set_xticks(range(len(ticks)), ticks)
    what = "eval metrics" if evals else "verify metrics"
    fig.suptitle(f"{summary.sweep_dir.name}: {xlabel} vs {what} ({len(rows)} jobs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(sweep_dir: Path) -> Summary:
    """Collect every job under `sweep_dir` and write summary.csv, summary.md and summary.png there."""
    summary = collect(Path(sweep_dir))
    d = summary.sweep_dir
    (d / CSV_NAME).write_text(to_csv(summary))
    (d / MD_NAME).write_text(to_markdown(summary))
    plot(summary, d / PNG_NAME)
    summary.files = [d / CSV_NAME, d / MD_NAME, d / PNG_NAME]
    return summary
