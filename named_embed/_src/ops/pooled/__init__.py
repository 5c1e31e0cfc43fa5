"""Pooled lookups (`pooled_lookup`, `EmbeddingBag`): the public entry points
(`lookup`), their options and bag inputs (`bag_inputs`), the jitted kernel
(`kernel`), the chunked reductions on one device (`reductions`) and across
devices (`parallel`).
"""
