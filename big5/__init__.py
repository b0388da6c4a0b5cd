"""The `big5` command: composition root that wires the shared core and the edge packages."""
