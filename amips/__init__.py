"""amips: maximum inner product search that learns from its query distribution.

Three methods in one pipeline: amortized MIPS (SupportNet / KeyNet), score-aware
(anisotropic) vector quantization with lookup-table scoring, and an IVF searcher with
learned routing. Exact labels come from certified-exact Triton/torch kernels.
"""

__version__ = "0.1.0"

# first: in a plain source tree, binds kernels/ (beside amips/) as amips.kernels
from . import _kernels_path  # noqa: F401
from ._validate import InputError
from .data import Dataset, load_array, load_dataset, synthetic
from .index import IVFIndex
from .labels import exact_top1, exact_topk, partition_top1
from .models import load_model
from .tune import tune  # noqa: E402  (the function; the package is amips.tune in sys.modules)

__all__ = [
    "__version__",
    "InputError",
    "Dataset",
    "load_array",
    "load_dataset",
    "synthetic",
    "exact_top1",
    "exact_topk",
    "partition_top1",
    "IVFIndex",
    "load_model",
    "tune",
]
