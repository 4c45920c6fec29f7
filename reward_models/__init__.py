"""Reward models: the scoring wrapper, programmatic rules, and the score/evaluate entry points."""
