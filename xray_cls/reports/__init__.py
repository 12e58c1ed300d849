"""Layer 7, reports: what a finished run and a sweep leave behind.
May import: core, runtime, data, metrics, models, training.

- `test_report`: a test's metrics.json, figures and console table, written in one step;
- `figures`, `tables`, `network_summary`, `gradcam`: the figures, the console table, the network's
  layers, Grad-CAM maps;
- `sweep`, `sweep_runs`, `sweep_figures`: the sweep report (report.md, summary.csv, figures/), from
  its runs' files read as untrusted; `course_report`, `cross_validation`: two of its sections.
"""
