"""Evaluation: Inception features with clean-fid, FID and KID against reference statistics."""
