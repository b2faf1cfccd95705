"""n:m sparsity: the pattern type, exact projection masks, target selection and the ADMM sparsifier."""

from nxm_deploy.sparsity.mask import count_nm_violations, nm_mask, nm_project
from nxm_deploy.sparsity.pattern import NMPattern

__all__ = ["NMPattern", "nm_mask", "nm_project", "count_nm_violations"]
