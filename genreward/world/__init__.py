"""The shapes world: a generator with exact scene graphs and a verifier that reads them back from pixels."""
