"""``reflexflow demo``: a measured exposure-bias and sample-quality study on real digits.

Modules: deps (optional imports), progress (progress bars), data (digits, toys), model
(tiny UNet, MLP, feature classifier), metrics (Frechet distance, precision/recall, MMD),
study (training and evaluation of every method), report (results.json/.md and figures).
scikit-learn, matplotlib and tqdm are the optional ``demo`` extra, imported only here.
"""

from .methods import METHODS, method_knobs
from .study import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo", "METHODS", "method_knobs"]
