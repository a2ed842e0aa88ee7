"""lcmla's training package: LCM-Lookahead identity-loss training of the identity adapter and the
KV-encoder LoRA (``python -m training train``), and consistent-identity data generation
(``python -m training datagen``). Importing it loads no torch."""
