"""Adapters to the conventions of other flow-matching codebases (none of them is imported).

* SiT (``Transport.training_losses``): :class:`SiTTransportAdapter`, :func:`drop_labels`,
  :func:`sit_label_embedder`.
* diffusers (SD3, Flux; noise at sigma = 1): :class:`DiffusersModelAdapter`,
  :func:`diffusers_knobs` (the DreamBooth scripts' sigma draw and loss weighting:
  :class:`DiffusersSigmaSampler`, :class:`DiffusersLossWeighting`), Flux's latent
  packing and image ids, :class:`ShiftedSigmaSampler`.
* Meta's flow_matching (``scheduler(t) -> alpha_t, sigma_t, d_alpha_t, d_sigma_t``):
  :func:`path_from_scheduler`, :class:`FunctionPath`.
* torchcfm (``ConditionalFlowMatcher`` and subclasses): :func:`torchcfm_path`,
  :class:`LipmanOTPath`.

Every adapter maps onto reflexflow's canonical convention (data at t = 1):
x_t = a(t) x1 + s(t) eps, u_t = a'(t) x1 + s'(t) eps (docs/method.md section 1).
tests/test_peers.py checks them against the real packages when they are installed.

One module per codebase: flow_matching.py, torchcfm.py, sit.py, diffusers.py (knobs and
the model adapter), diffusers_sigmas.py (sigma tables, draws, weighting), flux.py (latent
packing and image ids).
"""

from .diffusers import DiffusersModelAdapter, diffusers_knobs
from .diffusers_sigmas import (
    FLUX_SCHEDULER,
    SD3_SCHEDULER,
    WEIGHTING_SCHEMES,
    DiffusersLossWeighting,
    DiffusersSigmaSampler,
    ShiftedSigmaSampler,
    flux_shift_mu,
    scheduler_sigma_table,
)
from .flow_matching import FunctionPath, path_from_scheduler
from .flux import flux_latent_image_ids, flux_pack_latents, flux_unpack_latents
from .sit import SiTTransportAdapter, drop_labels, sit_label_embedder, sit_path
from .torchcfm import LipmanOTPath, torchcfm_path

__all__ = [
    "FunctionPath",
    "path_from_scheduler",
    "LipmanOTPath",
    "torchcfm_path",
    "drop_labels",
    "sit_path",
    "sit_label_embedder",
    "SiTTransportAdapter",
    "DiffusersModelAdapter",
    "diffusers_knobs",
    "DiffusersSigmaSampler",
    "DiffusersLossWeighting",
    "scheduler_sigma_table",
    "flux_shift_mu",
    "flux_pack_latents",
    "flux_unpack_latents",
    "flux_latent_image_ids",
    "ShiftedSigmaSampler",
    "SD3_SCHEDULER",
    "FLUX_SCHEDULER",
    "WEIGHTING_SCHEMES",
]
