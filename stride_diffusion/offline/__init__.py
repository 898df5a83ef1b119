"""Offline tools: train demo models, fit classifiers, evaluate samplers; they write artifacts."""
