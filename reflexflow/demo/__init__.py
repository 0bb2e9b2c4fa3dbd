"""``reflexflow demo``: measured exposure-bias and sample-quality studies (exact oracle, data).

Modules: deps (optional imports), progress (progress bars), data (digits, toys), photos
(32x32x3 crops of scikit-image's photographs), model (UNets, MLP, classifiers), sit (SiT-S/2),
metrics (Frechet distance, precision/recall, MMD, model cache), spectrum (radial power
spectrum, band scores), photo_features (the photos feature network), methods (the rows and
their loss knobs), settings (DemoConfig and its presets), scoring (scores, bias curves),
study (training and evaluation of every method), report (results.json/.md), figures;
oracle (the exact-oracle mixture and its closed-form velocity u*), oracle_metrics (exact
scores), oracle_study and oracle_report (the default study), jobs (resumable runs, Ctrl-C),
outdir (the --out checks).
scikit-learn, scikit-image, matplotlib and tqdm are the optional ``demo`` extra, imported
only here.
"""

from .methods import METHODS, method_knobs
from .study import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo", "METHODS", "method_knobs"]
