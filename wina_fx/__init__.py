"""wina-fx: a torch.compile backend for training-free activation sparsity.

    compiled = torch.compile(model, backend="wina", options={"sparsity": 0.5})
"""
from .calibration import Calibration, calibrate
from .config import WinaConfig, WinaOptionError
from .methods import Method, get_method, method_names, register_method
from .report import Report, last_report, reports

__all__ = ["Calibration", "calibrate", "WinaConfig", "WinaOptionError", "Method", "register_method", "get_method",
           "method_names", "Report", "last_report", "reports"]
__version__ = "0.1.0"
