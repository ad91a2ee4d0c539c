"""Placement propagation and lowering passes over the traced joint graph."""
