"""Evaluation: Dice, IoU and HD95 per class and case, pictures, the run report, cross-validation
and the post-processing decided from it."""
