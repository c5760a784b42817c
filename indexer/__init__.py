"""indexer: the embedding pipeline (readers -> catalog -> encoder -> vectors). Imports medsearch only."""
