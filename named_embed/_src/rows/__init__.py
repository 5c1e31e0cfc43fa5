"""The kernel half of the table contract, on raw arrays: how a table is held
(`table_arrays`), row sources (`row_source`: `RowSource`, the plain table's
`DenseSource`), reading a source one vocabulary chunk at a time
(`row_chunks`), and the kernels written once against sources: the row gather
and its gradient rules (`gather`), the chunked cross-entropy (`chunked_ce`)
and its vocabulary-parallel form (`vocab_parallel`). Imports `base` only.
"""
