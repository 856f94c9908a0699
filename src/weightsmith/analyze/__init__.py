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

from .compare import Comparison, compare_matrices, intruder_dimensions, subspace_overlap
from .compare_run import ComparisonResult, compare_weights
from .conv import layer_esd, layer_shape
from .distances import distances
from .farms import FarmsConfig, farms_alpha, farms_esd
from .frame import describe
from .mp import MPFit, marchenko_pastur_fit
from .nuclear import matrix_nuclear_norm, text_mnn
from .powerlaw import PowerLawFit, alpha_at_quantile, fit_power_law
from .report_sections import add_analysis, add_comparison
from .run import AnalysisResult, analyze_weights
from .smoothing import svd_smoothing
from .spectrum import effective_rank, esd, norm_metrics

__all__ = [
    "AnalysisResult", "Comparison", "ComparisonResult", "FarmsConfig", "MPFit", "PowerLawFit",
    "add_analysis", "add_comparison", "alpha_at_quantile", "analyze_weights", "compare_matrices",
    "compare_weights", "describe", "distances", "effective_rank", "esd", "farms_alpha", "farms_esd",
    "fit_power_law", "intruder_dimensions", "layer_esd", "layer_shape", "marchenko_pastur_fit",
    "matrix_nuclear_norm", "norm_metrics", "subspace_overlap", "svd_smoothing", "text_mnn",
]  # fmt: skip
