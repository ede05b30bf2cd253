"""The CPU demo: a pretrained synthetic base, synthetic users, PPD vs baselines, evaluation."""
