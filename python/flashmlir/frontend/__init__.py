"""The FX side: our attention op, the matcher that inserts it, and the import to MLIR."""
