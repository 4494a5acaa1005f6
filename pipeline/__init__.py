"""Ray-based knowledge-distillation pipeline for CTR models."""
