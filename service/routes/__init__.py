"""HTTP routers of the service: one thin module per feature."""
