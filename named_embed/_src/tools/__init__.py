"""Tools on whole tables: nearest neighbours and analogies (`inspection`), the
treescope summary and `ne.show` (`rendering`), vocabulary resizing
(`resizing`, `new_rows`), finding the tables of a model (`model_tables`) and
placing trees on a mesh (`sharding`). Imports `ops` and below.
"""
