"""Experiment planning: the dataset fingerprint and nnU-Net v2's rules that turn it into typed,
versioned plans (spacing, patch, network topology, batch size), each choice explained."""
