"""Training with the LCM-Lookahead identity loss (arrives with the training issue)."""
