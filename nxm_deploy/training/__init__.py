"""Training stages (dense, ADMM n:m + KD, INT8 QAT + KD) and the shared loop."""
