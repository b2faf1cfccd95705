"""Training stages (dense, ADMM n:m + KD, INT8 QAT + KD) as ``transformers.Trainer`` runs (:mod:`.trainer`)."""
