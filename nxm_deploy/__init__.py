"""nxm-deploy: n:m (2:4) sparse + INT8 transformer deployment pipeline.

Importing this package is cheap: it pulls in no torch, onnx or tensorrt. Stage modules
import their heavy dependencies themselves.
"""

__version__ = "0.1.0"
