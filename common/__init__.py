"""Small, method-agnostic pieces shared by the method scripts: data, DiffAugment, EMA, metrics, run plumbing."""
