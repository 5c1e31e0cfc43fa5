"""The table contract (`contract`: `AbstractTable`, `check_table`) and the
kinds of table: `EmbeddingTable` (`table`), `QuantizedTable`, `LoraTable`,
`TrainableRowsTable` (the adapted ones share `adapted`). Each kind is one
module: its Struct and its row source. Imports `rows` and `base`; a method
that returns what a higher layer builds (a resized table, a page) imports it
inside the method.
"""
