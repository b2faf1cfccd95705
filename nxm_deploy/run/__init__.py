"""A run directory: its layout (:mod:`nxm_deploy.run.layout`, every path and file name) and the one way to read its
artifacts (:mod:`nxm_deploy.run.reader`: manifests checked by hash, stage models, masks, the QAT model).

Importing this package imports neither torch nor transformers (the reader does, when imported).
"""

from nxm_deploy.run.layout import MANIFEST, RunLayout

__all__ = ["MANIFEST", "RunLayout"]
