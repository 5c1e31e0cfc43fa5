"""The operations on tables: lookups, decodes, the fused decode + cross-entropy
loss (one device, or the vocabulary split over a mesh axis) and pooled
lookups (`pooled`). Imports `tables`, `rows`, `base`.
"""
