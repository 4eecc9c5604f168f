"""Exact linear algebra in float64: condition numbers, probe Hessians, eigenvalues, regularizers.

No training code, optimizers or data loading live here.
"""

from __future__ import annotations

from immunekit.spectral.condition import (
    KappaInfo,
    condition_number,
    default_rtol,
    gram_condition_number,
    kappa_from_values,
    psd_factor,
)
from immunekit.spectral.eig import ExtremeEigs, dense_extreme_eigs, extreme_eigs, lanczos_extreme_eigs
from immunekit.spectral.hessians import (
    covariance,
    l2_probe_hessian,
    linear_l2_hessian,
    logistic_probe_hessian,
    softmax_probe_hessian,
    symmetrize,
)
from immunekit.spectral.regularizers import (
    Preconditioner,
    SpectralGrad,
    delta,
    g_ill,
    g_log_kappa,
    g_well,
    make_preconditioner,
    precondition_layer,
    psd_eigh,
    r_ill,
    r_ill_autograd,
    r_ill_grad,
    r_ill_step_bound,
    r_ill_theta_grad,
    r_well,
    r_well_autograd,
    r_well_grad,
    r_well_step_bound,
    r_well_theta_grad,
    theta_grad,
)

__all__ = [
    "ExtremeEigs",
    "KappaInfo",
    "Preconditioner",
    "SpectralGrad",
    "condition_number",
    "covariance",
    "default_rtol",
    "delta",
    "dense_extreme_eigs",
    "extreme_eigs",
    "g_ill",
    "g_log_kappa",
    "g_well",
    "gram_condition_number",
    "kappa_from_values",
    "l2_probe_hessian",
    "lanczos_extreme_eigs",
    "linear_l2_hessian",
    "logistic_probe_hessian",
    "make_preconditioner",
    "precondition_layer",
    "psd_eigh",
    "psd_factor",
    "r_ill",
    "r_ill_autograd",
    "r_ill_grad",
    "r_ill_step_bound",
    "r_ill_theta_grad",
    "r_well",
    "r_well_autograd",
    "r_well_grad",
    "r_well_step_bound",
    "r_well_theta_grad",
    "softmax_probe_hessian",
    "symmetrize",
    "theta_grad",
]
