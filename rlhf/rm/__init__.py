"""The reward model: `train` (make rm: the reward adapter and head, K-way rankings, ensembles), `scoring` (reading
a reward on the shared base: what PPO, eval and the diagnostics use), `selection` (the best checkpoint, early
stopping), `diagnostics` (held-out accuracy, calibration, per-flaw accuracy) and `probes` (reward-hacking probes).
Nothing is imported here: `scoring` sits below the stage libraries that import it (tests/test_layout.py)."""
