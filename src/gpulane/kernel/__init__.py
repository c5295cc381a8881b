"""Kernel-side helpers for the ``%%gpu`` magic: what a cell needs, and moving values across."""
