"""The self-contained HTML report: renders the sidecar files other commands write, never recomputes."""

from moecompress.report.render import REPORT_NAME, build_report, write_report

__all__ = ["REPORT_NAME", "build_report", "write_report"]
