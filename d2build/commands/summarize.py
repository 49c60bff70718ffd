"""d2build summarize SWEEP_DIR ...: (re)write a sweep's summary.csv, summary.md and summary.png."""

from __future__ import annotations

import sys
from pathlib import Path

SUMMARY = "rewrite a sweep folder's summary (CSV, Markdown, plot) from its jobs' run.json; exit 1 if a job failed"


def main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print("usage: d2build summarize SWEEP_DIR [SWEEP_DIR ...]\n"
              "  reads every job's run.json under SWEEP_DIR (e.g. outputs/sweeps/<date>/<time>-<recipe>)\n"
              "  and writes summary.csv, summary.md and summary.png there; prints the Markdown table.\n"
              "  Exit status: 0 all jobs ok, 1 some job failed, 2 no jobs found.",
              file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    from d2build.sweep_summary import to_markdown, write_summary

    rc = 0
    for arg in argv:
        d = Path(arg)
        if not d.is_dir():
            print(f"d2build summarize: {d} is not a folder (pass a sweep folder, e.g. outputs/sweeps/DATE/TIME-RECIPE)",
                  file=sys.stderr)
            rc = 2
            continue
        summary = write_summary(d)
        if not summary.rows:
            print(f"d2build summarize: no jobs under {d} (no run.json or .hydra/overrides.yaml found)", file=sys.stderr)
            rc = 2
            continue
        print(to_markdown(summary))
        print("wrote " + ", ".join(str(f) for f in summary.files))
        if summary.failed and rc == 0:
            print(f"d2build summarize: {len(summary.failed)} job(s) failed: {', '.join(summary.failed)}",
                  file=sys.stderr)
            rc = 1
    return rc
