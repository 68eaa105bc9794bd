"""The only package that imports Ray: actors, channels, the pipeline graph, the ledger."""
