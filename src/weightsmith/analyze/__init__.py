"""analyze: read what the weights say.

Spectral metrics of every 2-D weight (power-law alpha, norms, stable and effective rank, Marchenko-Pastur
soft rank and spikes, FARMS alpha), intruder dimensions between a base and a fine-tuned model, and the
Matrix Nuclear-Norm of a language model's hidden states on a text.

    from weightsmith import models
    from weightsmith.analyze import analyze_weights
    result = analyze_weights(models.open_weights("minilm"))
    result.to_json()                   # {"model", "matrices", "skipped", "summary"}
    result.to_pandas()                 # WeightWatcher's details DataFrame, same column names
    add_analysis(report, result)       # sections for a weightsmith.report.Report
"""

from .cka import linear_cka
from .compare import Comparison, compare_matrices, intruder_dimensions, subspace_overlap
from .compare_run import ComparisonResult, compare_weights
from .conv import layer_esd, layer_shape
from .datadiet import el2n_scores, grand_scores, select_subset
from .distances import distances
from .farms import FarmsConfig, farms_alpha, farms_esd
from .fingers import xmin_peak_fit
from .frame import describe
from .landscape import hessian_trace, mode_connectivity, top_hessian_eigenvalue
from .mp import MPFit, marchenko_pastur_fit
from .nuclear import matrix_nuclear_norm, text_mnn
from .phases import PhaseGrid, phase_grid
from .powerlaw import PowerLawFit, alpha_at_quantile, fit_power_law
from .report_sections import add_analysis, add_comparison, add_phases
from .richlazy import model_weight_changes, run_regime
from .run import AnalysisResult, analyze_weights
from .sketch import sketched_singular_values, streamed_norm_metrics, streaming_power
from .smoothing import svd_smoothing
from .spectrum import effective_rank, esd, norm_metrics
from .tpl import TPLFit, fit_truncated_power_law
from .wpca import rank_correlation, wpca_score

__all__ = [
    "AnalysisResult", "Comparison", "ComparisonResult", "FarmsConfig", "MPFit", "PhaseGrid", "PowerLawFit",
    "TPLFit", "add_analysis", "add_comparison", "add_phases", "alpha_at_quantile", "analyze_weights",
    "compare_matrices", "compare_weights", "describe", "distances", "effective_rank", "el2n_scores", "esd",
    "farms_alpha", "farms_esd", "fit_power_law", "fit_truncated_power_law", "grand_scores", "hessian_trace",
    "intruder_dimensions", "layer_esd", "layer_shape", "linear_cka", "marchenko_pastur_fit",
    "matrix_nuclear_norm", "mode_connectivity", "model_weight_changes", "norm_metrics", "phase_grid",
    "rank_correlation", "run_regime", "select_subset", "sketched_singular_values", "streamed_norm_metrics",
    "streaming_power", "subspace_overlap", "svd_smoothing", "text_mnn", "top_hessian_eigenvalue",
    "wpca_score", "xmin_peak_fit",
]  # fmt: skip
