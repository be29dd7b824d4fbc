"""Evaluation: Inception features (clean and adm modes), FID, sFID, IS, precision/recall and KID."""
