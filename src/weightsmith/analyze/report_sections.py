"""Report sections for analyze and compare results (plots from ``weightsmith.report.analyze_plots``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import WeightsmithError
from ..report import analyze_plots as plots

if TYPE_CHECKING:
    from .compare_run import ComparisonResult
    from .phases import PhaseResult
    from .run import AnalysisResult

# the summary's JSON keys (shown as they are) and what each means
_SUMMARY_MEANING = {
    "num_matrices": "matrices analysed", "num_skipped": "tensors skipped",
    "mean_alpha": "mean power-law alpha",
    "median_alpha": "median alpha", "num_alpha_below_2": "matrices with alpha < 2",
    "num_alpha_above_6": "matrices with alpha > 6", "num_alpha_undefined": "matrices without a fitted alpha",
    "mean_alpha_weighted": "mean alpha * log10(lambda_max)", "mean_log_norm": "mean log10 ||W||_F^2",
    "mean_log_spectral_norm": "mean log10 lambda_max", "mean_stable_rank": "mean ||W||_F^2 / ||W||_2^2",
    "mean_effective_rank": "mean entropy effective rank", "mean_mp_softrank": "mean MP soft rank",
    "mean_num_spikes": "mean eigenvalues above the MP bulk", "mean_farms_alpha": "mean FARMS alpha",
    "device": "device", "seconds": "wall time of the analysis",
}  # fmt: skip
# the per-matrix table: JSON keys, in this order
MATRIX_COLUMNS = ("name", "shape", "alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank",
                  "effective_rank", "mp_softrank", "num_spikes", "farms_alpha", "xmin", "ks_distance",
                  "num_pl_spikes", "warning")  # fmt: skip
ESD_RULES = {
    "worst_fit": "the largest power-law KS distance (ks_distance): the least power-law-like tails",
    "most_spikes": "the most eigenvalues above the Marchenko-Pastur bulk (num_spikes)",
    "extreme_alpha": "alpha farthest outside [2, 6] (the Martin-Mahoney well-trained band)",
    "spread": "evenly spaced over the model: first, middle and last matrices",
}


def _rule_key(rule: str, m: dict[str, Any]) -> float:
    if rule == "worst_fit":
        return m.get("ks_distance") or 0.0
    if rule == "most_spikes":
        return m.get("num_spikes") or 0
    a = m["alpha"]
    return max(2.0 - a, a - 6.0, 0.0)


def choose_esds(result: AnalysisResult, count: int, rule: str = "worst_fit") -> list[dict[str, Any]]:
    """Up to ``count`` matrices with a kept ESD and a defined alpha, chosen by ``rule`` (``ESD_RULES``);
    ties (and ``spread``) keep model order."""
    if rule not in ESD_RULES:
        raise WeightsmithError(f"esd_rule must be one of {', '.join(ESD_RULES)}, got {rule!r}")
    have = [m for m in result.matrices if m["name"] in result.esds and m["alpha"] is not None]
    if count <= 0 or not have:
        return []
    if rule == "spread":
        if len(have) <= count:
            return have
        idx = sorted({round(i * (len(have) - 1) / max(count - 1, 1)) for i in range(count)})
        return [have[i] for i in idx]
    return sorted(have, key=lambda m: -_rule_key(rule, m))[:count]


def _layer_plot(
    report: Any, recs: list[dict[str, Any]], key: str, title: str, caption: str, **kw: Any
) -> None:
    """The per-layer plot of ``key``, or a sentence saying why there is none."""
    if plots.has_layer_series(recs, key):
        report.figure(plots.plot_layer_metric(recs, key, key, title, **kw), caption)
    else:
        report.text(
            f"No per-layer plot of {key}: no matrix has both a layer index in its name and a {key} value."
        )


def add_analysis(
    report: Any,
    result: AnalysisResult,
    title: str | None = None,
    esd_examples: int = 6,
    esd_rule: str = "worst_fit",
) -> None:
    """Summary table, per-layer alpha / stable rank / MP plots, example ESDs chosen by ``esd_rule``
    (``ESD_RULES``) and the full per-matrix table (sortable); metric names are the JSON keys."""
    chosen = choose_esds(result, esd_examples, esd_rule)
    name = title or f"Spectral analysis: {result.model}"
    summary = result.summary()
    report.section(
        name,
        "Power-law alpha of each weight matrix's eigenvalue spectrum (lambda = sigma^2; maximum likelihood "
        "with the KS-optimal xmin, as WeightWatcher). Martin & Mahoney read 2 < alpha < 6 as well trained, "
        "alpha < 2 as over-fitted and alpha > 6 as under-trained. FARMS alpha pools fixed-aspect-ratio "
        "sub-matrices so that layers of different shapes are comparable. Metric names are the keys of the "
        "JSON output.",
    )
    report.table(
        ["metric", "value", "meaning"], [[k, v, _SUMMARY_MEANING.get(k, "")] for k, v in summary.items()]
    )
    recs = result.matrices
    _layer_plot(report, recs, "alpha", "power-law alpha per layer", "alpha per layer and matrix kind; "
                "dashed lines at 2 and 6", bands=(2, 6))  # fmt: skip
    if result.farms:
        _layer_plot(
            report, recs, "farms_alpha", "FARMS alpha per layer", "farms_alpha per layer", bands=(2, 6)
        )
    _layer_plot(report, recs, "stable_rank", "||W||_F^2 / ||W||_2^2", "stable_rank per layer (log scale)",
                log=True)  # fmt: skip
    _layer_plot(report, recs, "mp_softrank", "Marchenko-Pastur soft rank", "mp_softrank = lambda_plus / "
                "lambda_max: small means strong spikes beyond the random bulk")  # fmt: skip
    if chosen:
        report.text(
            f"Example ESDs: the {len(chosen)} matrices with {ESD_RULES[esd_rule]} (rule '{esd_rule}')."
        )
    elif esd_examples > 0:
        report.text("No example ESDs: no matrix kept its spectrum with a fitted alpha (keep_esd=False, or no "
                    "alpha was defined).")  # fmt: skip
    for m in chosen:
        fig = plots.plot_esd(result.esds[m["name"]], m["alpha"], m["xmin"], m["name"])
        extra = {"worst_fit": "ks_distance", "most_spikes": "num_spikes"}.get(esd_rule, "alpha")
        report.figure(
            fig,
            f"ESD of {m['name']} {m['shape']}: alpha={m['alpha']:.3g}, fitted tail above xmin={m['xmin']:.4g}"
            + (f", {extra}={m.get(extra)}" if extra != "alpha" else ""),
        )
    rows = [
        [m.get(c) if c != "shape" else "x".join(map(str, m["shape"])) for c in MATRIX_COLUMNS] for m in recs
    ]
    report.table(
        list(MATRIX_COLUMNS), rows, caption="per-matrix metrics (click a header to sort)", sortable=True
    )
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


PHASE_COLUMNS = ("temperature", "load", "phase", "train_loss", "test_acc", "top_eigenvalue", "hessian_trace",
                 "mc", "mc_naive", "loss_barrier", "cka")  # fmt: skip


def add_phases(report: Any, result: PhaseResult, title: str | None = None) -> None:
    """The phase diagram, the per-metric heat maps and the per-cell table of a ``phases.phase_grid`` run."""
    from ..report import phase_plots

    g, th = result.grid, result.thresholds
    hot_is_small = g.temperature == "batch_size"
    report.section(
        title or f"Phases of learning: {g.task}, {g.temperature} x {g.load}",
        "Loss-landscape taxonomy of Yang et al. (NeurIPS 2021) over a grid of zoo MLPs "
        f"(depth {g.depth}, {g.epochs} epochs of Adam, {g.seeds} seeds per cell). "
        "Phase I: poorly connected and sharp; II: poorly connected and flat; III: well connected and sharp; "
        "IV-A / IV-B: well connected and flat, with dissimilar / similar models. "
        f"Rule used: poorly connected when mc < -{th['mc_tol']:.3g} (mode connectivity of the training loss "
        "on the straight path between two seeds after weight matching), sharp when the Hessian trace > "
        f"{th['sharp_trace']:.4g}, similar when linear CKA >= {th['similar_cka']:.3g}.",
    )
    cells = result.cells
    report.figure(
        phase_plots.plot_phase_diagram(cells, g.load, g.temperature, hot_is_small),
        "phase of each cell; the paper finds the best test accuracy in phase IV-B",
    )
    report.figure(
        phase_plots.plot_metric_grid(cells, g.load, g.temperature, hot_is_small),
        "metrics per cell, same axes (log10 colour scale for losses and Hessian metrics)",
    )
    report.table(list(PHASE_COLUMNS), [[c.get(k) for k in PHASE_COLUMNS] for c in cells], caption="per cell")
