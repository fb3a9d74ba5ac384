"""Detection losses (one family per file) and, separately, distillation losses."""
