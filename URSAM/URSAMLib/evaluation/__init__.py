"""Scoring and measuring the method: ``ursam evaluate``, metrics, ``ursam bench``, the demo and its phantom."""
from __future__ import annotations
