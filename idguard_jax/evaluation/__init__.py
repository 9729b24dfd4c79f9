"""Evaluation: the per-image measures (`measure`), image metrics (`metrics`), the baselines
(`baselines`), the robustness operations (`robustness`) and the tables and grids (`report`)."""
