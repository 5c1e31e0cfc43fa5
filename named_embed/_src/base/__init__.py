"""Base helpers: argument checks, named-axis plumbing, norms, initialisers,
where arrays live on a mesh, agreement between processes, the out-of-range
policy, integer quantisation of raw arrays, and `Vocabulary`. Modules here
import no other named_embed layer (only each other).
"""
