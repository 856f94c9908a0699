"""Report sections for analyze and compare results (plots from ``weightsmith.report.analyze_plots``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..report import analyze_plots as plots

if TYPE_CHECKING:
    from .compare_run import ComparisonResult
    from .run import AnalysisResult

_SUMMARY_LABELS = {
    "num_matrices": "matrices analysed", "num_skipped": "tensors skipped", "mean_alpha": "mean alpha",
    "median_alpha": "median alpha", "num_alpha_below_2": "alpha < 2", "num_alpha_above_6": "alpha > 6",
    "num_alpha_undefined": "alpha undefined", "mean_alpha_weighted": "mean alpha-hat",
    "mean_log_norm": "mean log10 ||W||_F^2", "mean_log_spectral_norm": "mean log10 lambda_max",
    "mean_stable_rank": "mean stable rank", "mean_effective_rank": "mean effective rank",
    "mean_mp_softrank": "mean MP soft rank", "mean_num_spikes": "mean MP spikes",
    "mean_farms_alpha": "mean FARMS alpha", "device": "device", "seconds": "seconds",
}  # fmt: skip


def _esd_examples(result: AnalysisResult, count: int) -> list[dict[str, Any]]:
    """First, middle and last matrices with a defined alpha, spread over the model."""
    have = [m for m in result.matrices if m["name"] in result.esds and m["alpha"] is not None]
    if len(have) <= count:
        return have
    idx = sorted({round(i * (len(have) - 1) / (count - 1)) for i in range(count)})
    return [have[i] for i in idx]


def add_analysis(
    report: Any, result: AnalysisResult, title: str | None = None, esd_examples: int = 6
) -> None:
    """Summary table, per-layer alpha / stable rank / MP plots, example ESDs and the full metric table."""
    name = title or f"Spectral analysis: {result.model}"
    summary = result.summary()
    report.section(
        name,
        "Power-law alpha of each weight matrix's eigenvalue spectrum (lambda = sigma^2; maximum likelihood "
        "with the KS-optimal xmin, as WeightWatcher). Martin & Mahoney read 2 < alpha < 6 as well trained, "
        "alpha < 2 as over-fitted and alpha > 6 as under-trained. FARMS alpha pools fixed-aspect-ratio "
        "sub-matrices so that layers of different shapes are comparable.",
    )
    report.table(["metric", "value"], [[_SUMMARY_LABELS.get(k, k), v] for k, v in summary.items()])
    recs = result.matrices
    report.figure(plots.plot_layer_metric(recs, "alpha", "alpha", "power-law alpha per layer", bands=(2, 6)),
                  "alpha per layer and matrix kind; dashed lines at 2 and 6")  # fmt: skip
    if result.farms:
        report.figure(plots.plot_layer_metric(recs, "farms_alpha", "FARMS alpha", "FARMS alpha per layer",
                                              bands=(2, 6)), "FARMS alpha per layer")  # fmt: skip
    report.figure(plots.plot_layer_metric(recs, "stable_rank", "stable rank", "||W||_F^2 / ||W||_2^2",
                                          log=True), "stable rank per layer (log scale)")  # fmt: skip
    report.figure(plots.plot_layer_metric(recs, "mp_softrank", "MP soft rank", "Marchenko-Pastur soft rank"),
                  "lambda_plus / lambda_max: small means strong spikes beyond the random bulk")  # fmt: skip
    for m in _esd_examples(result, esd_examples):
        fig = plots.plot_esd(result.esds[m["name"]], m["alpha"], m["xmin"], m["name"])
        report.figure(fig, f"ESD of {m['name']} {m['shape']}, fitted tail above xmin={m['xmin']:.4g}")
    cols = ["name", "shape", "alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank",
            "effective_rank", "mp_softrank", "num_spikes", "farms_alpha"]  # fmt: skip
    rows = [[m[c] if c != "shape" else "x".join(map(str, m["shape"])) for c in cols] for m in recs]
    report.table(cols, rows, caption="per-matrix metrics")
    if result.skipped:
        report.table(["skipped tensor", "reason"], [[s["name"], s["reason"]] for s in result.skipped],
                     caption=f"{len(result.skipped)} tensors not analysed")  # fmt: skip


def add_comparison(report: Any, result: ComparisonResult, title: str | None = None) -> None:
    """Intruder-dimension plot and table for a base / fine-tuned comparison."""
    report.section(
        title or f"Intruder dimensions: {result.other} vs {result.base}",
        f"A top-{result.k} left singular vector of the fine-tuned matrix is an intruder when its largest "
        f"|cosine| with every base singular vector is below {result.epsilon} (Shuttleworth et al., 2024). "
        "Energy is the intruders' share of the fine-tuned matrix's squared singular values.",
    )
    report.table(["metric", "value"], list(result.summary().items()))
    report.figure(plots.plot_intruders(result.matrices, result.k, result.epsilon), "intruders per layer")
    cols = [
        "name",
        "num_intruders",
        "intruder_energy",
        "subspace_overlap",
        "relative_norm",
        "delta_effective_rank",
    ]
    rows = [[m[c] for c in cols] for m in result.matrices]
    report.table(cols, rows, caption="per-matrix comparison")
    if result.skipped:
        report.table(["skipped tensor", "reason"], [[s["name"], s["reason"]] for s in result.skipped])
